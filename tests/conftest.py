"""Session fixtures: tiny tokenizers and models built in tmp dirs (no network, no shared data)."""

from __future__ import annotations

import os

import pytest

from tests import builders

# Tests that run llama.cpp next to another busy process must not use 2 threads on 2 cores.
os.environ.setdefault("CLLAMA_N_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def base_sp_model(tmp_path_factory):
    """LLaMA-like BPE tokenizer.model (512 pieces, byte fallback)."""
    return builders.train_llama_like_sp(tmp_path_factory.mktemp("base_sp") / "tokenizer.model")


@pytest.fixture(scope="session")
def zh_sp_model(tmp_path_factory):
    """Chinese unigram tokenizer (700 pieces, nmt_nfkc), the kind merged into LLaMA's vocabulary."""
    return builders.train_zh_sp(tmp_path_factory.mktemp("zh_sp") / "chinese_sp.model")
