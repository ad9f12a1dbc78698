"""Our converter against transformers (the reference) and llama.cpp (the runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gguf import builders_gguf as bg

PROMPT = "Below is an instruction. 请用中文回答：今天天气怎么样？"


def _tokens(model_dir, text=PROMPT):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return [1] + sp.encode(text)


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for name, d in tiny_models.items()}


@pytest.mark.parametrize("shape", ["mha_untied", "gqa_tied"])
def test_f32_logits_equal_transformers(shape, tiny_models, tiny_ggufs, hf_models):
    tokens = _tokens(tiny_models[shape])
    ref = bg.torch_logits(hf_models[shape], tokens)
    got = bg.llama_logits(bg.load_llama(tiny_ggufs[shape]["f32"]), tokens)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) < 1e-3, np.max(np.abs(got - ref))


@pytest.mark.parametrize("shape", ["mha_untied", "gqa_tied"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_greedy_continuation_matches_transformers(shape, outtype, tiny_models, tiny_ggufs, hf_models):
    tokens = _tokens(tiny_models[shape])
    ref = bg.torch_greedy(hf_models[shape], tokens, 32)
    got = bg.llama_greedy(bg.load_llama(tiny_ggufs[shape][outtype]), tokens, 32)
    assert got == ref


@pytest.mark.parametrize("shape", ["mha_untied", "gqa_tied"])
def test_q8_0_teacher_forced_top1_agrees_with_f32(shape, tiny_models, tiny_ggufs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_models[shape] / "tokenizer.model"))
    tokens = ([1] + sp.encode(bg.MIXED_TEXT + " " + PROMPT))[:90]
    f32 = bg.llama_logits(bg.load_llama(tiny_ggufs[shape]["f32"]), tokens)
    q8 = bg.llama_logits(bg.load_llama(tiny_ggufs[shape]["q8_0"]), tokens)
    agree = np.mean(np.argmax(f32, axis=-1) == np.argmax(q8, axis=-1))
    assert agree >= 0.9, agree


def test_llama_cpp_tokenizer_matches_sentencepiece(tiny_models, tiny_ggufs, merged_tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(merged_tok))
    llm = bg.load_llama(tiny_ggufs["mha_untied"]["f16"], vocab_only=True)
    texts = [bg.MIXED_TEXT, PROMPT, "Hello world", "中文分词测试：北京大学", "  leading spaces and\nnewlines\t tab",
             "数字 12345 和 emoji 🙂 与罕见字 龘"]
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True) == [1] + sp.encode(text), text
        # and back: llama.cpp's detokenizer gives SentencePiece's text (it keeps the space prefix
        # that SentencePiece strips at the start of a text)
        back = llm.detokenize(sp.encode(text)).decode("utf-8")
        assert back.removeprefix(" ") == sp.decode(sp.encode(text)), text


def test_metadata_and_tensor_types(tiny_models, tiny_ggufs, merged_tok):
    from cllama_deploy.gguf.inspect import inspect_gguf
    from cllama_deploy.prompts import ALPACA_V1_CHAT_TEMPLATE

    n = bg.sp_size(merged_tok)
    untied = inspect_gguf(tiny_ggufs["mha_untied"]["f16"])
    tied = inspect_gguf(tiny_ggufs["gqa_tied"]["q8_0"])
    m = tied.metadata
    assert m["general.architecture"] == "llama"
    assert m["llama.attention.head_count"] == 4 and m["llama.attention.head_count_kv"] == 2
    assert m["llama.rope.freq_base"] == 500000.0
    assert m["llama.context_length"] == 256 and m["llama.vocab_size"] == n
    assert m["general.file_type"] == 7 and untied.metadata["general.file_type"] == 1
    assert tied.chat_template == ALPACA_V1_CHAT_TEMPLATE
    assert tied.vocab["size"] == n and tied.vocab["specials"]["bos"]["id"] == 1
    assert tied.vocab["add_bos"] is True and tied.vocab["add_eos"] is False
    names = {t["name"]: t for t in tied.tensors}
    assert "output.weight" not in names  # tied: llama.cpp uses token_embd
    assert "output.weight" in {t["name"] for t in untied.tensors}
    for t in tied.tensors:
        want = "F32" if t["name"].endswith("_norm.weight") else "Q8_0"
        assert t["type"] == want, t
    assert names["token_embd.weight"]["shape"] == [64, n]


def test_q8_0_falls_back_to_f16_for_rows_not_multiple_of_32(tmp_path, merged_tok):
    from cllama_deploy.gguf.convert import ConvertConfig, convert
    from cllama_deploy.gguf.inspect import inspect_gguf
    from tests import builders

    model = builders.make_tiny_llama(tmp_path / "m", bg.sp_size(merged_tok), hidden_size=64, intermediate_size=80,
                                     num_layers=1, tokenizer_model=merged_tok)
    out = tmp_path / "m.gguf"
    convert(ConvertConfig(model_dir=model, out=out, outtype="q8_0", show_progress=False))
    types = {t["name"]: t["type"] for t in inspect_gguf(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80 values
    assert types["blk.0.ffn_up.weight"] == "Q8_0"


def test_permutation_matches_llama_cpp_rope_layout():
    from cllama_deploy.gguf.convert import permute_qk

    # 2 heads of size 4: HF halves (0,1 | 2,3) become llama.cpp pairs (0,2), (1,3) per head
    w = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_streaming_multi_output_equals_single_outputs(tmp_path, tiny_models, tiny_ggufs):
    """One pass writing several types gives byte-identical files to separate conversions."""
    from cllama_deploy.gguf.convert import convert_source
    from cllama_deploy.merge import merged_source

    src = merged_source(tiny_models["gqa_tied"], [])
    outs = [(tmp_path / f"{t}.gguf", t) for t in ("f32", "f16", "q8_0")]
    convert_source(src, outs, name="gqa_tied", show_progress=False)
    for path, t in outs:
        assert path.read_bytes() == tiny_ggufs["gqa_tied"][t].read_bytes(), t
    assert not list(tmp_path.glob("*.partial"))


def test_chunked_tensor_writes_are_byte_identical(tmp_path, tiny_models, tiny_ggufs, monkeypatch):
    """Large tensors are encoded and written in row chunks; the bytes must not change."""
    import cllama_deploy.gguf.convert as conv
    from cllama_deploy.merge import merged_source

    monkeypatch.setattr(conv, "CHUNK_VALUES", 1000)  # every 2-D tensor is chunked, rows split unevenly
    src = merged_source(tiny_models["mha_untied"], [])
    outs = [(tmp_path / f"{t}.gguf", t) for t in ("f32", "f16", "q8_0")]
    conv.convert_source(src, outs, name="mha_untied", show_progress=False)
    for path, t in outs:
        assert path.read_bytes() == tiny_ggufs["mha_untied"][t].read_bytes(), t


def test_fast_f16_cast_is_byte_identical_to_numpy():
    from cllama_deploy.gguf.fastcast import f32_to_f16

    x = np.random.default_rng(0).standard_normal((300, 257)).astype(np.float32) * 3
    x[0, :10] = [0.0, -0.0, 1e-8, -6e-5, 6.1e-5, 65504.0, 65520.0, 1e6, np.inf, -np.inf]
    x[1, :] = np.linspace(-1e-4, 1e-4, 257)  # subnormal halves
    with np.errstate(over="ignore"):
        assert f32_to_f16(x).view(np.uint16).tobytes() == x.astype(np.float16).view(np.uint16).tobytes()
    assert f32_to_f16(x[:, ::2]).shape == (300, 129)  # non-contiguous input
