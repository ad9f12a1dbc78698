"""Helpers for the LangChain tests. Their model is the engine tests' ``engine_gguf`` (tests/conftest.py: a tiny
random LLaMA on a 1000-piece BPE, f32 GGUF, 1024-token trained context); engines run llama.cpp with 1 thread
(tests/conftest.py sets CLLAMA_N_THREADS)."""

from __future__ import annotations

import inspect

import pytest



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
