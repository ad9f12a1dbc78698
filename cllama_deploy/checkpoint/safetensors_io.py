"""Reading and writing the safetensors format with numpy alone.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, then N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the data; offsets count from the first byte after the header. We parse it ourselves because bf16 has no
numpy dtype (the ``safetensors`` package's numpy backend refuses it): each tensor is memory-mapped
as its raw bits and widened to float32 exactly (bf16 is the upper half of a float32).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cllama_deploy.errors import CheckpointError

# safetensors dtype name -> (numpy storage dtype, bytes per element). bf16 is stored as uint16 bits.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# The float formats a LLaMA checkpoint may hold; anything else (GPTQ/AWQ integer packs, fp8) is refused.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header. Returns ``({name: TensorInfo}, metadata)`` in data-offset order."""
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: file is too short to be safetensors; re-download or re-save it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n}); re-download it")
            header_bytes = fh.read(n)
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-download or re-save it") from exc
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}; re-save the file") from exc
        if base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {base + end} but the file has {size} bytes "
                "(truncated download?); re-download the file"
            )
        infos[name] = TensorInfo(dtype, shape, base + begin, base + end)
    ordered = dict(sorted(infos.items(), key=lambda kv: kv[1].start))
    return ordered, metadata


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bf16 (given as uint16 bit patterns) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (round to nearest, ties to even, like torch); returns uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's payload into the exponent: keep a quiet NaN
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def read_tensor(path: Path, info: TensorInfo, name: str) -> np.ndarray:
    """Memory-map one tensor; float32 for F32/BF16/F64, float16 for F16.

    An F32/F16 result is a read-only view of the mapped file (no copy); the mapping lives as long as
    the array does, so dropping the array releases the pages.
    """
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {info.dtype}; only F32/F16/BF16 checkpoints are supported "
            "(de-quantize GPTQ/AWQ/fp8 checkpoints to a float HF model first)"
        )
    storage = STORAGE_DTYPES[info.dtype]
    count = int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1
    if count * storage.itemsize != info.end - info.start:
        raise CheckpointError(
            f"{path}: tensor {name!r} has {info.end - info.start} bytes but shape {list(info.shape)} "
            f"in {info.dtype} needs {count * storage.itemsize}; the file is corrupt, re-download it"
        )
    if count == 0:
        return np.zeros(info.shape, dtype=np.float16 if info.dtype == "F16" else np.float32)
    data = np.memmap(path, dtype=storage, mode="r", offset=info.start, shape=(count,)).reshape(info.shape)
    if info.dtype == "BF16":
        return bf16_bits_to_f32(data)
    if info.dtype == "F64":
        return data.astype(np.float32)
    return data


# numpy dtype name of an output -> safetensors dtype name
OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast a float array to the storage of ``dtype`` (``float32``/``float16``/``bfloat16``), C-contiguous."""
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype="<f4")
    if dtype == "float16":
        return np.ascontiguousarray(array, dtype="<f2")
    if dtype == "bfloat16":
        return f32_to_bf16_bits(np.asarray(array, dtype=np.float32))
    raise ValueError(f"unknown output dtype {dtype!r}")


def itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


class ShardWriter:
    """Write one safetensors file whose tensor list is known in advance, one tensor at a time.

    The header (with every offset) is computed from the planned shapes and written first, so no tensor
    has to be held in memory after it is written.
    """

    def __init__(self, fh: BinaryIO, plan: Iterable[tuple[str, tuple[int, ...]]], dtype: str,
                 metadata: dict[str, str] | None = None):
        self._fh = fh
        self._dtype = dtype
        self._expected: list[tuple[str, tuple[int, ...], int]] = []
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        size = itemsize(dtype)
        st_dtype = OUTPUT_DTYPES[dtype]
        for name, shape in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * size
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, tuple(shape), nbytes))
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned (the format allows trailing spaces)
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        want_name, want_shape, nbytes = self._expected[self._next]
        if name != want_name or tuple(array.shape) != want_shape:
            raise AssertionError(f"shard writer expected {want_name}{list(want_shape)}, got {name}{list(array.shape)}")
        data = encode(array, self._dtype)
        assert data.nbytes == nbytes
        self._fh.write(memoryview(data).cast("B"))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise AssertionError("shard writer closed before every planned tensor was written")
