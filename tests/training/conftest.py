"""Session fixtures for the training tests: tiny LLaMAs, a merged tokenizer, text and Alpaca data."""

from __future__ import annotations

import pytest


from tests import builders
from tests.training import builders_training as bt


@pytest.fixture(scope="session")
def merged_tok_dir(tmp_path_factory, base_sp_model, zh_sp_model):
    """The merged (base 512 + Chinese) tokenizer as `cllama-deploy tokenizer merge` writes it
    (tokenizer.model + HF files)."""
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers

    d = tmp_path_factory.mktemp("merged_tok") / "tok"
    merge_tokenizers(TokenizerMergeConfig(base=base_sp_model, add=zh_sp_model, out=d))
    return d


@pytest.fixture(scope="session")
def merged_size(merged_tok_dir):
    return bt.piece_count(merged_tok_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, base_sp_model):
    """Random 2-layer LLaMA with the base tokenizer's 512-row vocabulary (the '32000' case)."""
    return builders.make_tiny_llama(tmp_path_factory.mktemp("base_model"), 512, tokenizer_model=base_sp_model,
                                    max_position_embeddings=512)


@pytest.fixture(scope="session")
def merged_model_dir(tmp_path_factory, merged_tok_dir, merged_size):
    """Random 2-layer LLaMA whose vocabulary already matches the merged tokenizer (the '49953/49953' case)."""
    return builders.make_tiny_llama(tmp_path_factory.mktemp("merged_model"), merged_size,
                                    tokenizer_model=merged_tok_dir / "tokenizer.model",
                                    max_position_embeddings=512, seed=1)


@pytest.fixture(scope="session")
def pt_data_dir(tmp_path_factory):
    return bt.write_pt_texts(tmp_path_factory.mktemp("pt_data"), n_files=2, lines=80)


@pytest.fixture(scope="session")
def sft_data_dir(tmp_path_factory):
    return bt.write_alpaca(tmp_path_factory.mktemp("sft_data"), n=96)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models train ~10x faster on one thread when the 2 cores are shared with other processes;
    restored after each test so other areas' tests keep their setting."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
