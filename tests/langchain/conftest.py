"""Fixtures for the LangChain tests: a tiny random LLaMA (2 layers, hidden 64) on a 1000-piece
SentencePiece BPE, converted to an f32 GGUF by our converter (alpaca chat template, 1024-token trained
context). Engines run llama.cpp with 1 thread (tests/conftest.py sets CLLAMA_N_THREADS)."""

from __future__ import annotations

import inspect

import pytest

from tests import builders
from tests.server import builders_server as bs


def asyncio_tests(cls):
    """Mark a standard suite's ``async def`` tests for pytest-asyncio (strict mode here; langchain's
    own packages run asyncio_mode=auto). The mark goes on the suite's functions themselves, in this
    process: overriding them would fail the suite's test_no_overrides_DO_NOT_OVERRIDE."""
    for klass in cls.__mro__:
        for name, fn in vars(klass).items():
            if name.startswith("test_") and inspect.iscoroutinefunction(fn) \
                    and not any(m.name == "asyncio" for m in getattr(fn, "pytestmark", [])):
                pytest.mark.asyncio(fn)
    return cls


@pytest.fixture(scope="session")
def lc_sp_model(tmp_path_factory):
    return builders.train_llama_like_sp(tmp_path_factory.mktemp("lc_sp") / "tokenizer.model",
                                        vocab_size=1000)


@pytest.fixture(scope="session")
def lc_gguf(tmp_path_factory, lc_sp_model):
    return bs.tiny_gguf(tmp_path_factory.mktemp("lc_gguf"), lc_sp_model, max_position_embeddings=1024)
