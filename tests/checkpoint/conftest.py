"""Session fixtures for the checkpoint readers: one tiny LLaMA saved in several layouts."""

from __future__ import annotations

import warnings

import pytest

from tests.builders import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny untied GQA LLaMA (vocab 300, not a multiple of 256) in f32 safetensors."""
    return make_tiny_llama(tmp_path_factory.mktemp("ckpt") / "base", 300, num_heads=4, num_kv_heads=2, seed=5)


@pytest.fixture(scope="session")
def tiny_state(tiny_base):
    """The reference tensors, read with the safetensors package (torch)."""
    from safetensors.torch import load_file

    return load_file(str(tiny_base / "model.safetensors"))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
