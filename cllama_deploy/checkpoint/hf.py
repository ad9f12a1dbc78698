"""Lazy reader for Hugging Face LLaMA-family model directories.

Reads ``config.json`` and the weights, in this order of preference: ``model.safetensors``,
``model.safetensors.index.json`` + shards, ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` +
shards. safetensors data is memory-mapped tensor by tensor with numpy alone; pickle ``.bin`` files need
torch (``torch.load(weights_only=True, mmap=True)``) and are refused with a clear message without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cllama_deploy.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
from cllama_deploy.errors import CheckpointError, require

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Tensors found in some checkpoints that are not weights and that every loader recomputes; we hide them
# from names() so that the merge and the converter never see them.
IGNORED_SUFFIXES: dict[str, str] = {
    # a buffer that transformers < 4.31 saved into LLaMA checkpoints; recomputed from rope_theta
    "rotary_emb.inv_freq": "rotary frequencies (derived from config rope_theta)",
}


def _ignored(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in IGNORED_SUFFIXES)


def read_json(path: Path, what: str, fix: str) -> dict:
    """Read a JSON object, or raise CheckpointError naming the file and ``fix``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: malformed {what} ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: malformed {what} (expected a JSON object); {fix}")
    return data


_CONFIG_FIX = "point --base at a Hugging Face model directory (the one save_pretrained wrote)"

# config.json fields a LLaMA-family checkpoint must carry, with their expected Python type.
REQUIRED_CONFIG: dict[str, type] = {
    "hidden_size": int,
    "num_attention_heads": int,
    "num_hidden_layers": int,
    "vocab_size": int,
}


def load_config(directory: Path, flag: str = "--base") -> dict:
    """Read and sanity-check ``config.json`` (types of the fields every later stage relies on); ``flag``
    is the option that named the directory, for the message."""
    path = directory / "config.json"
    config = read_json(path, "model config (config.json)", _CONFIG_FIX.replace("--base", flag))
    for key, typ in REQUIRED_CONFIG.items():
        value = config.get(key)
        if not isinstance(value, typ) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(
                f"{path}: malformed config: '{key}' must be a positive integer, got {value!r}; "
                "fix config.json or re-save the model with save_pretrained"
            )
    kv = config.get("num_key_value_heads")
    if kv is not None and (not isinstance(kv, int) or kv <= 0):
        raise CheckpointError(f"{path}: malformed config: 'num_key_value_heads' must be a positive integer, got {kv!r}")
    return config


class _TorchShard:
    """One pickle checkpoint file, opened with torch only when a tensor is first asked for."""

    def __init__(self, path: Path):
        self.path = path
        self._state: dict | None = None

    def state(self) -> dict:
        if self._state is None:
            torch = require("torch", "train")
            try:
                try:
                    state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    # files saved by torch < 1.6 (legacy, non-zip format) cannot be memory-mapped
                    state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean "unreadable"
                raise CheckpointError(
                    f"{self.path}: cannot load this pickle checkpoint safely ({type(exc).__name__}: {exc}); "
                    "re-save the model as safetensors (save_pretrained(..., safe_serialization=True))"
                ) from exc
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{self.path}: expected a state dict of tensors; re-save the model")
            self._state = state
        return self._state


def torch_to_numpy(tensor, name: str, path: Path) -> np.ndarray:
    """A torch tensor as float32 (bf16/f32/f64) or float16 (f16) numpy array."""
    import torch

    if tensor.dtype == torch.float16:
        return tensor.numpy()
    if tensor.dtype in (torch.float32, torch.bfloat16, torch.float64):
        return tensor.to(torch.float32).numpy()
    raise CheckpointError(
        f"{path}: tensor {name!r} has dtype {tensor.dtype}; only float32/float16/bfloat16 checkpoints "
        "are supported (de-quantize the model first)"
    )


def _torch_dtype_name(tensor) -> str:
    return {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
            "torch.float64": "F64"}.get(str(tensor.dtype), str(tensor.dtype))


class HFCheckpoint:
    """A Hugging Face model directory read lazily (implements :class:`TensorSource`).

    Attributes:
        path: the directory.
        config: ``config.json`` content.
        tokenizer_dir: the directory when it holds ``tokenizer.model``, else None.
        weight_files: the weight files, in order.
        format: ``"safetensors"`` or ``"bin"``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model directory not found; {_CONFIG_FIX}")
        self.config = load_config(self.path)
        self.tokenizer_dir = self.path if (self.path / "tokenizer.model").is_file() else None
        self._st: dict[str, tuple[Path, TensorInfo]] = {}
        self._bin: dict[str, _TorchShard] = {}
        self._bin_order: list[str] = []
        self._open_weights()

    # -- discovery ---------------------------------------------------------------------------------
    def _open_weights(self) -> None:
        p = self.path
        if (p / SAFETENSORS_SINGLE).is_file():
            self.format = "safetensors"
            self.weight_files = [p / SAFETENSORS_SINGLE]
        elif (p / SAFETENSORS_INDEX).is_file():
            self.format = "safetensors"
            self.weight_files = self._index_files(p / SAFETENSORS_INDEX)
        elif (p / BIN_SINGLE).is_file():
            self.format = "bin"
            self.weight_files = [p / BIN_SINGLE]
        elif (p / BIN_INDEX).is_file():
            self.format = "bin"
            self.weight_files = self._index_files(p / BIN_INDEX)
        else:
            raise CheckpointError(
                f"{p}: no weights found (looked for {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE}, "
                f"{BIN_INDEX}); save the model with save_pretrained into this directory"
            )
        if self.format == "safetensors":
            for file in self.weight_files:
                infos, _ = read_header(file)
                for name, info in infos.items():
                    if name in self._st:
                        raise CheckpointError(f"{file}: tensor {name!r} also appears in {self._st[name][0].name}; "
                                              "the shards overlap, re-save the model")
                    if not _ignored(name):
                        self._st[name] = (file, info)
            self._check_index_covered()
        else:
            require("torch", "train")  # fail now, before any work, with the extra to install
            for file in self.weight_files:
                shard = _TorchShard(file)
                for name in shard.state():
                    if _ignored(name):
                        continue
                    if name in self._bin:
                        raise CheckpointError(f"{file}: tensor {name!r} appears in two shards; re-save the model")
                    self._bin[name] = shard
                    self._bin_order.append(name)
            self._check_index_covered()

    def _index_files(self, index_path: Path) -> list[Path]:
        index = read_json(index_path, "shard index", "re-download it or re-save the model with save_pretrained")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: malformed shard index (no 'weight_map'); re-save the model")
        self._weight_map = weight_map
        files: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            file = self.path / shard
            if not file.is_file():
                raise CheckpointError(
                    f"{file}: shard listed in {index_path.name} is missing; download every shard of the model"
                )
            files.append(file)
        return sorted(files, key=lambda f: f.name)

    def _check_index_covered(self) -> None:
        weight_map = getattr(self, "_weight_map", None)
        if not weight_map:
            return
        found = self._st if self.format == "safetensors" else self._bin
        for name, shard in weight_map.items():
            if _ignored(name):
                continue
            if name not in found:
                raise CheckpointError(
                    f"{self.path / shard}: tensor {name!r} listed in the index is not in that shard; "
                    "the download is incomplete or the index is stale, re-download the model"
                )
            actual = found[name][0] if self.format == "safetensors" else found[name].path
            if actual.name != Path(shard).name:
                raise CheckpointError(f"{self.path}: the index puts {name!r} in {shard} but it is in "
                                      f"{actual.name}; re-save the model")

    # -- TensorSource ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, by position in the file)."""
        if self.format == "safetensors":
            return list(self._st)
        return list(self._bin_order)

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: the model has no tensor {name!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        if self.format == "safetensors":
            if name not in self._st:
                raise self._missing(name)
            return self._st[name][1].shape
        if name not in self._bin:
            raise self._missing(name)
        return tuple(self._bin[name].state()[name].shape)

    def dtype(self, name: str) -> str:
        """Storage dtype of a tensor as a safetensors name: ``F32``, ``F16``, ``BF16`` ..."""
        if self.format == "safetensors":
            if name not in self._st:
                raise self._missing(name)
            return self._st[name][1].dtype
        if name not in self._bin:
            raise self._missing(name)
        return _torch_dtype_name(self._bin[name].state()[name])

    def get(self, name: str) -> np.ndarray:
        """float32 for F32/BF16 storage, float16 for F16; F32/F16 safetensors data is a read-only mmap view."""
        if self.format == "safetensors":
            if name not in self._st:
                raise self._missing(name)
            file, info = self._st[name]
            return read_tensor(file, info, name)
        if name not in self._bin:
            raise self._missing(name)
        shard = self._bin[name]
        return torch_to_numpy(shard.state()[name], name, shard.path)

    def storage_dtype(self) -> str:
        """The most common float storage dtype among the 2-D weights (``F32``/``F16``/``BF16``)."""
        counts: dict[str, int] = {}
        for name in self.names():
            shape = self.shape(name)
            if len(shape) == 2:
                d = self.dtype(name)
                counts[d] = counts.get(d, 0) + int(np.prod(shape))
        return max(counts, key=counts.get) if counts else "F32"

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, {self.format}, {len(self.names())} tensors)"


def open_hf(path: str | Path) -> HFCheckpoint:
    """Open a Hugging Face model directory lazily.

    Raises:
        CheckpointError: the directory, ``config.json`` or the weights are missing or malformed.
        DependencyError: the weights are pickle ``.bin`` files and torch is not installed.
    """
    return HFCheckpoint(path)
