"""llama.cpp quantization through our wrapper: every type loads and generates; the report is right."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gguf import builders_gguf as bg


def test_every_type_loads_and_generates(tmp_path, q256_f16):
    from cllama_deploy.gguf.quantize import QuantizeConfig, available_types, quantize

    prompt = [1, 100, 200, 300, 400, 500]
    failures = []
    for qtype in available_types():
        out = tmp_path / f"q-{qtype}.gguf"
        res = quantize(QuantizeConfig(input=q256_f16, output=out, type=qtype, threads=1), show_progress=False)
        assert out.is_file() and res.size_bytes == out.stat().st_size
        assert 0 < res.bits_per_weight <= 32.0
        llm = bg.load_llama(out, n_ctx=32)
        toks = bg.llama_greedy(llm, prompt, 4)
        logits = np.array(llm.scores[: llm.n_tokens])
        if not (len(toks) == 4 and all(0 <= t < llm.n_vocab() for t in toks) and np.isfinite(logits).all()):
            failures.append(qtype)
        del llm
        out.unlink()
    assert not failures, failures


def test_fallback_report_names_the_incompatible_tensors(tmp_path, q256_f16):
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize

    res = quantize(QuantizeConfig(input=q256_f16, output=tmp_path / "q4km.gguf", type="q4_k_m", threads=1),
                   show_progress=False)
    assert res.type == "Q4_K_M" and res.base_type == "Q4_K"
    fallbacks = {t.name: t for t in res.fallbacks}
    # ffn_down rows have 384 values: not a multiple of the 256-value k-quant block
    assert set(fallbacks) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert all(t.type in ("Q5_0", "Q5_1", "Q8_0", "Q4_0", "F16") for t in fallbacks.values())
    by_name = {t.name: t for t in res.tensors}
    assert by_name["blk.0.attn_q.weight"].type == "Q4_K" and by_name["blk.0.attn_q.weight"].status == "quantized"
    assert by_name["blk.0.attn_norm.weight"].status == "kept"
    assert by_name["blk.0.attn_norm.weight"].type == "F32"
    assert res.size_bytes < res.input_size_bytes


def test_pure_and_tensor_type_overrides(tmp_path, q256_f16):
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize

    res = quantize(QuantizeConfig(input=q256_f16, output=tmp_path / "pure.gguf", type="Q4_K_M", pure=True,
                                  output_tensor_type="q8_0", token_embedding_type="f16", threads=1),
                   show_progress=False)
    types = {t.name: t.type for t in res.tensors}
    assert types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_v.weight"] == "Q4_K"  # no mixture: Q4_K_M would give attn_v Q6_K


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "IQ1_S", "Q2_K_S", "IQ3_XXS"])
def test_types_needing_an_importance_matrix_are_refused(tmp_path, q256_f16, qtype):
    from cllama_deploy.errors import ConfigError
    from cllama_deploy.gguf.quantize import QuantizeConfig

    with pytest.raises(ConfigError, match="importance matrix"):
        QuantizeConfig(input=q256_f16, output=tmp_path / "x.gguf", type=qtype)


def test_bad_inputs(tmp_path, q256_f16):
    from cllama_deploy.errors import ConfigError, InputError
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize

    with pytest.raises(ConfigError, match="not a llama.cpp quantization type"):
        QuantizeConfig(input=q256_f16, output=tmp_path / "x.gguf", type="Q9_K")
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(InputError, match="not a GGUF file"):
        QuantizeConfig(input=not_gguf, output=tmp_path / "x.gguf", type="Q4_0")
    with pytest.raises(InputError, match="no such file"):
        QuantizeConfig(input=tmp_path / "missing.gguf", output=tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="--output-tensor-type"):
        QuantizeConfig(input=q256_f16, output=tmp_path / "x.gguf", output_tensor_type="q9")
    q8 = tmp_path / "q8.gguf"
    quantize(QuantizeConfig(input=q256_f16, output=q8, type="Q8_0", threads=1), show_progress=False)
    with pytest.raises(InputError, match="already quantized"):
        quantize(QuantizeConfig(input=q8, output=tmp_path / "q4.gguf", type="Q4_0", threads=1), show_progress=False)
    assert not (tmp_path / "q4.gguf").exists() and not list(tmp_path.glob("*.partial"))
    # allowed on request
    quantize(QuantizeConfig(input=q8, output=tmp_path / "q4.gguf", type="Q4_0", threads=1, allow_requantize=True),
             show_progress=False)
    assert (tmp_path / "q4.gguf").is_file()
