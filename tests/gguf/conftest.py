"""Session fixtures for the GGUF tests: tokenizers, tiny LLaMAs (MHA/GQA, tied/untied, vocab not a
multiple of 256) and their GGUFs written by our converter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import builders
from tests.gguf import builders_gguf as bg


@pytest.fixture(scope="session")
def base_tok(tmp_path_factory):
    return bg.base_tokenizer(tmp_path_factory.mktemp("gguf_base_tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def merged_tok(tmp_path_factory, base_tok):
    """LLaMA-like tokenizer with Chinese pieces appended (as the seed's merge does)."""
    zh = bg.zh_tokenizer(tmp_path_factory.mktemp("gguf_zh_tok") / "zh.model")
    path = bg.merge_sp(base_tok, zh, tmp_path_factory.mktemp("gguf_merged_tok") / "tokenizer.model")
    assert bg.sp_size(path) % 256, "the merged vocabulary must not be a multiple of 256"
    return path


# name → make_tiny_llama options
SHAPES = {
    "mha_untied": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, merged_tok):
    root = tmp_path_factory.mktemp("gguf_models")
    n = bg.sp_size(merged_tok)
    return {name: bg.tame(builders.make_tiny_llama(root / name, n, tokenizer_model=merged_tok, seed=i, **opts))
            for i, (name, opts) in enumerate(SHAPES.items())}


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory, tiny_models):
    """{shape: {outtype: path}}: f32, f16 and q8_0 of every tiny model, written by `convert`."""
    from cllama_deploy.gguf.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("gguf_files")
    out = {}
    for name, model_dir in tiny_models.items():
        out[name] = {}
        for outtype in ("f32", "f16", "q8_0"):
            path = root / f"{name}-{outtype}.gguf"
            convert(ConvertConfig(model_dir=model_dir, out=path, outtype=outtype, show_progress=False))
            out[name][outtype] = path
    return out


@pytest.fixture(scope="session")
def q256_model(tmp_path_factory, base_tok):
    """Hidden size 256 (k-quants apply) with intermediate 384 (ffn_down rows are not a multiple of 256,
    so k-quants must fall back there)."""
    return builders.make_tiny_llama(tmp_path_factory.mktemp("gguf_q256") / "model", bg.sp_size(base_tok),
                                    hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=384,
                                    tokenizer_model=base_tok, seed=5)


@pytest.fixture(scope="session")
def q256_f16(tmp_path_factory, q256_model):
    from cllama_deploy.gguf.convert import ConvertConfig, convert

    path = tmp_path_factory.mktemp("gguf_q256_f16") / "q256-f16.gguf"
    convert(ConvertConfig(model_dir=q256_model, out=path, outtype="f16", show_progress=False))
    return path


def _q256_variant(tmp_path_factory, q256_model, name: str, transform):
    import shutil

    from cllama_deploy.gguf.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp(f"gguf_q256_{name}")
    model = transform(Path(shutil.copytree(q256_model, root / "model")))
    path = root / f"q256-{name}-f16.gguf"
    convert(ConvertConfig(model_dir=model, out=path, outtype="f16", show_progress=False))
    return path


@pytest.fixture(scope="session")
def q256_tame_f16(tmp_path_factory, q256_model):
    """q256_model with projections of std 0.025 (trained LLaMAs' range): a network whose top-1 is stable
    enough that each quantization type's agreement with F16 says something about the type."""
    return _q256_variant(tmp_path_factory, q256_model, "tame", lambda d: bg.tame(d, 0.05))


@pytest.fixture(scope="session")
def q256_ternary_f16(tmp_path_factory, q256_model):
    return _q256_variant(tmp_path_factory, q256_model, "ternary", lambda d: bg.snap_weights(d, "ternary"))


@pytest.fixture(scope="session")
def q256_binary_f16(tmp_path_factory, q256_model):
    return _q256_variant(tmp_path_factory, q256_model, "binary", lambda d: bg.snap_weights(d, "binary"))
