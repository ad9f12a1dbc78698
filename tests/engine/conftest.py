"""Fixtures for the engine tests: engines over ``engine_gguf`` (tests/conftest.py: a tiny random LLaMA, 2 layers,
hidden 64, on a 1000-piece SentencePiece BPE, f32 GGUF by our converter, with a 1024-token trained context so
prompts of several hundred tokens fit). Engines run llama.cpp with 1 thread (the CPU is shared)."""

from __future__ import annotations

import pytest

from tests.server import builders_server as bs


@pytest.fixture(scope="session")
def alone(engine_gguf):
    """The reference: one slot, no prefix cache, one request at a time."""
    eng = bs.load_engine(engine_gguf, n_ctx=1024, parallel=1, prefix_cache=False)
    yield eng
    eng.close(10)


@pytest.fixture(scope="session")
def batched(engine_gguf):
    """Six slots, prefix cache on, small prefill chunks so prompts interleave with decoding."""
    eng = bs.load_engine(engine_gguf, n_ctx=1024, parallel=6, prefill_chunk=32)
    yield eng
    eng.close(10)
