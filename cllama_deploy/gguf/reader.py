"""Reading GGUF files: the magic check, opening with ``gguf.GGUFReader``, field decoding, weight totals.

Every module that reads a GGUF (inspect, quantize's report, the vocabulary reader, evaluation) goes
through these, so a file that is not a GGUF gets the same one-line error everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cllama_deploy.errors import InputError

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a readable file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def check_gguf_file(path: str | Path, flag: str | None = "MODEL") -> Path:
    """``path`` as a Path after checking that it is a file starting with the GGUF magic.

    Raises:
        InputError: no such file, or not a GGUF file (the message names ``flag``, the option or
            argument that gave the path, and says what to do).
    """
    p = Path(path)
    label = f"{flag} {p}" if flag else str(p)
    if not p.is_file():
        raise InputError(f"{label}: no such file")
    if not is_gguf(p):
        raise InputError(f"{label}: not a GGUF file (it does not start with 'GGUF'); "
                         "convert the model first with `cllama-deploy convert`")
    return p


def open_gguf(path: str | Path, flag: str | None = "MODEL"):
    """A ``gguf.GGUFReader`` (memory-mapped) on a checked GGUF file.

    Raises:
        InputError: not a GGUF file, or one the gguf package cannot parse (truncated, newer format).
    """
    import gguf

    p = check_gguf_file(path, flag)
    try:
        return gguf.GGUFReader(str(p), "r")
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file fails in many ways
        raise InputError(f"{f'{flag} ' if flag else ''}{p}: unreadable GGUF ({type(exc).__name__}: {exc}); the file is truncated, "
                         "corrupt or newer than the installed gguf package: write it again or "
                         "pip install -U gguf") from exc


def field_value(f, errors: str = "replace") -> Any:
    """A ``GGUFReader`` field as a Python value: str, int, float, bool, or a list of those.

    ``errors`` is the UTF-8 decoding policy for strings (``surrogateescape`` keeps undecodable bytes).
    """
    import gguf

    vt = gguf.GGUFValueType
    kind = f.types[0] if f.types else None
    if kind == vt.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors)
    if kind == vt.ARRAY:
        if f.types[-1] == vt.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors) for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]].tolist()[0]
    return bool(value) if kind == vt.BOOL else value


def read_fields(reader, errors: str = "replace") -> dict[str, Any]:
    """Every key/value of an open GGUF, decoded (arrays in full), in file order (the reader's header
    pseudo-fields ``GGUF.version`` etc. left out)."""
    return {name: field_value(f, errors) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def get_field(reader, key: str, default: Any = None, errors: str = "replace") -> Any:
    """One decoded key's value, or ``default`` when the GGUF lacks it (``reader``: an open GGUFReader or a
    :class:`GGUFHeader`, whose fields are decoded already)."""
    if isinstance(reader, GGUFHeader):
        return reader.fields.get(key, default)
    f = reader.fields.get(key)
    return default if f is None else field_value(f, errors)


@dataclass
class WeightTotals:
    """Parameter and byte counts of a GGUF's tensors (what "bits per weight" is computed from)."""

    n_params: int = 0
    n_bytes: int = 0
    type_counts: dict[str, int] = field(default_factory=dict)  # GGML type name → tensors

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / self.n_params if self.n_params else 0.0


def weight_totals(reader) -> WeightTotals:
    """Totals over every tensor of an open GGUF."""
    totals = WeightTotals()
    for t in reader.tensors:
        totals.n_params += int(t.n_elements)
        totals.n_bytes += int(t.n_bytes)
        name = t.tensor_type.name
        totals.type_counts[name] = totals.type_counts.get(name, 0) + 1
    return totals


def file_type_of(reader) -> str | None:
    """The GGUF's ``general.file_type`` as a type name (Q4_K_M, F16, ...); None when absent."""
    from cllama_deploy.gguf import keys

    value = get_field(reader, keys.FILE_TYPE)
    if value is None:
        return None
    return keys.file_type_name(int(value)) or str(value)


# -- a fast header scan (deploy helper: issue 14 item 12) -------------------------------------------------
# gguf.GGUFReader builds numpy views of every array element: on a 49953-token vocabulary that takes
# ~5 s per open, longer than quantizing a small model. Reading the tensor table and the scalar keys only
# needs the array lengths, so this scan walks the header and skips the arrays' contents.

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class ArraySummary:
    """An array value left unread by :func:`scan_gguf`: its element type (GGUF value type) and length."""

    element_type: int
    count: int


@dataclass
class TensorEntry:
    """One row of a GGUF's tensor table (``shape`` in GGML order, row length first)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int
    n_elements: int
    n_bytes: int


@dataclass
class GGUFHeader:
    """What :func:`scan_gguf` read: scalar and string keys (arrays as :class:`ArraySummary`), tensors."""

    version: int
    fields: dict[str, Any]
    tensors: list[TensorEntry]


def scan_gguf(path: str | Path, flag: str | None = "MODEL") -> GGUFHeader:
    """Read a GGUF's keys and tensor table without reading array contents or tensor data.

    Raises:
        InputError: not a GGUF file, or a header that ends early or holds an unknown value type.
    """
    import mmap
    import struct

    import gguf

    p = check_gguf_file(path, flag)
    label = f"{flag} {p}" if flag else str(p)
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 4

        def take(fmt: str):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            raw = buf[pos:pos + n]
            pos += n
            return raw.decode("utf-8", "replace")

        def value(kind: int):
            nonlocal pos
            if kind in _SCALAR:
                return take(_SCALAR[kind])
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                elem, count = take("<I"), take("<Q")
                if elem in _SCALAR:
                    pos += count * struct.calcsize(_SCALAR[elem])
                elif elem == _STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                else:
                    raise ValueError(f"array of value type {elem}")
                return ArraySummary(elem, count)
            raise ValueError(f"value type {kind}")

        try:
            version = take("<I")
            n_tensors, n_kv = take("<Q"), take("<Q")
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                fields[key] = value(take("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = string()
                shape = tuple(take("<Q") for _ in range(take("<I")))
                qtype = gguf.GGMLQuantizationType(take("<I"))
                offset = take("<Q")
                n_el = 1
                for d in shape:
                    n_el *= int(d)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                tensors.append(TensorEntry(name, shape, qtype, offset, n_el, n_el // block * size))
        except (struct.error, ValueError, KeyError) as exc:
            raise InputError(f"{label}: unreadable GGUF header ({exc}); the file is truncated or corrupt, "
                             "write it again") from exc
    return GGUFHeader(version, fields, tensors)
