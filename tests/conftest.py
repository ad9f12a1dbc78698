"""Session fixtures: tiny tokenizers and models built in tmp dirs (no network, no shared data)."""

from __future__ import annotations

import os

import pytest

from tests import builders
from tests.server import builders_server

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


# A tiny random LLaMA (2 layers, hidden 64) on a 1000-piece BPE as an f32 GGUF with a 1024-token trained
# context: the engine tests' model, shared by the LangChain tests (built once per session).
@pytest.fixture(scope="session")
def engine_sp_model(tmp_path_factory):
    return builders.train_llama_like_sp(tmp_path_factory.mktemp("engine_sp") / "tokenizer.model",
                                        vocab_size=1000)


@pytest.fixture(scope="session")
def engine_gguf(tmp_path_factory, engine_sp_model):
    return builders_server.tiny_gguf(tmp_path_factory.mktemp("engine_gguf"), engine_sp_model,
                                     max_position_embeddings=1024)
