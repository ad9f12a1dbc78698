"""Lazy checkpoint readers.

Every reader and the streaming merge expose the same small :class:`TensorSource` interface, which the
GGUF converter and the deploy pipeline consume: a model is a config plus named tensors read one at a
time (memory-mapped), never a whole state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TensorSource(Protocol):
    """A LLaMA-family model in HF naming, read tensor by tensor.

    Attributes:
        config: the HF ``config.json`` content (for a merged source, with ``vocab_size`` updated).
        tokenizer_dir: directory holding ``tokenizer.model`` (and HF tokenizer files), or None.
    """

    config: dict
    tokenizer_dir: Path | None

    def names(self) -> list[str]:
        """HF tensor names, e.g. ``model.layers.0.self_attn.q_proj.weight``, in file order."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor without reading its data."""

    def get(self, name: str) -> np.ndarray:
        """The tensor's data: float32 for bf16/f32 storage (and for tensors a merge changed), float16 for
        f16 storage. It may be a read-only memory-mapped view: copy it before modifying it in place."""

    # Optional, implemented by every source in this package: ``dtype(name)`` gives the storage dtype
    # (``"F32"``, ``"F16"``, ``"BF16"``) without reading data.


# Readers (imported after TensorSource, which they refer to).
from cllama_deploy.checkpoint.hf import HFCheckpoint, open_hf  # noqa: E402
from cllama_deploy.checkpoint.peft import LoraAdapter, LoraPair, open_adapter  # noqa: E402

__all__ = ["TensorSource", "HFCheckpoint", "open_hf", "LoraAdapter", "LoraPair", "open_adapter"]
