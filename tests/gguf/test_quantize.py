"""llama.cpp quantization through our wrapper: every type loads and generates; the report is right."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gguf import builders_gguf as bg


# Least share of positions where a type's teacher-forced top-1 equals F16's, on 96 tokens of mixed text
# (tests/gguf/conftest.py q256_tame_f16; measured at 1 thread, the bound leaves ~0.1 for other CPUs'
# kernels). Looser for fewer bits; every type quantize offers must be listed. The 1-bit and ternary
# types are for models trained that way: they are checked on weights of that kind (below).
AGREEMENT = {
    "F32": 0.97, "F16": 0.97, "BF16": 0.97,                          # measured 1.00
    "Q8_0": 0.9, "MXFP4_MOE": 0.9, "Q6_K": 0.9,                      # 0.99
    "Q5_0": 0.8, "Q5_1": 0.8, "Q5_K_S": 0.8, "Q5_K_M": 0.8,          # 0.91-0.92
    "Q4_0": 0.72, "Q4_1": 0.72, "Q4_K_S": 0.72, "Q4_K_M": 0.72,      # 0.87-0.92
    "IQ4_NL": 0.72, "IQ4_XS": 0.72,                                  # 0.85-0.87
    "Q3_K_S": 0.6, "Q3_K_M": 0.6, "Q3_K_L": 0.6, "IQ3_S": 0.6, "IQ3_M": 0.6,  # 0.74-0.81
    "Q2_K": 0.45,                                                    # 0.62
}
# type → (weights, bound, quantize options): on binary / ternary projection weights
SNAPPED = {
    "Q1_0": ("binary", 0.9, {"token_embedding_type": "q8_0"}),     # measured 1.00
    "TQ1_0": ("ternary", 0.75, {"token_embedding_type": "q8_0"}),  # 0.87 (ffn_down falls back to Q4_0)
    "TQ2_0": ("ternary", 0.75, {"token_embedding_type": "q8_0"}),  # 0.87
}


def _agreement(tmp_path, f16, qtype, tokens, **options) -> tuple[float, float]:
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize

    out = tmp_path / f"q-{qtype}.gguf"
    res = quantize(QuantizeConfig(input=f16, output=out, type=qtype, threads=1, **options), show_progress=False)
    assert out.is_file() and res.size_bytes == out.stat().st_size
    assert 0 < res.bits_per_weight <= 32.0
    agree = float(np.mean(bg.teacher_forced_top1(out, tokens) == bg.teacher_forced_top1(f16, tokens)))
    out.unlink()
    return agree, res.bits_per_weight


def test_every_type_agrees_with_f16_within_its_bound(tmp_path, q256_model, q256_tame_f16, q256_ternary_f16,
                                                     q256_binary_f16):
    """Each type's teacher-forced top-1 against F16, with a bound per type (a broken type, or one that
    silently became another, gives a few percent)."""
    import sentencepiece as spm

    from cllama_deploy.gguf.quantize import available_types

    sp = spm.SentencePieceProcessor(model_file=str(q256_model / "tokenizer.model"))
    tokens = ([1] + sp.encode(bg.MIXED_TEXT * 3))[:96]
    assert len(tokens) == 96
    offered = set(available_types())
    assert offered == set(AGREEMENT) | set(SNAPPED), "give every type quantize offers a bound here"
    snapped = {"binary": q256_binary_f16, "ternary": q256_ternary_f16}
    results, failures = {}, []
    for qtype in sorted(offered):
        if qtype in SNAPPED:
            weights, bound, options = SNAPPED[qtype]
            agree, bpw = _agreement(tmp_path, snapped[weights], qtype, tokens, **options)
        else:
            bound = AGREEMENT[qtype]
            agree, bpw = _agreement(tmp_path, q256_tame_f16, qtype, tokens)
        results[qtype] = (round(agree, 3), round(bpw, 2))
        if agree < bound:
            failures.append(f"{qtype}: {agree:.3f} < {bound}")
    assert not failures, f"{failures}; all (agreement, bpw): {results}"


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
