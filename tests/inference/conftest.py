"""Fixtures for the terminal-inference tests: a tiny LLaMA (2 layers, hidden 64, GQA, tamed weights) on a
1000-piece LLaMA-like tokenizer with a real PEFT adapter (non-zero B), and the F32 GGUF of base + adapter
written by `deploy`, so the HF path (base + --lora) and the GGUF path run the same model. llama.cpp and torch
use 1 thread (the CPU is shared)."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import pytest

from tests import builders
from tests.gguf import builders_gguf as bg


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("CLLAMA_N_THREADS", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from cllama_deploy.pipeline import DeployConfig, deploy
    from tests.merge.builders_lora import make_adapter

    os.environ.setdefault("CLLAMA_N_THREADS", "1")
    root = tmp_path_factory.mktemp("inference")
    tok = bg.base_tokenizer(root / "tok" / "tokenizer.model")
    base = bg.tame(builders.make_tiny_llama(root / "base", bg.sp_size(tok), num_heads=4, num_kv_heads=2,
                                            max_position_embeddings=1024, tokenizer_model=tok, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), root / "lora", r=4, alpha=1, seed=4)
    out = deploy(DeployConfig(base=base, loras=[lora], quants=["F32"], out=root / "deploy", name="tiny",
                              show_progress=False, threads=1))
    return SimpleNamespace(root=root, tok=tok, base=base, lora=lora, gguf=out.outputs[0].path)
