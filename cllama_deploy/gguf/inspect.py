"""Read a GGUF's metadata, tensor table and vocabulary summary (``cllama-deploy inspect``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cllama_deploy.errors import InputError
from cllama_deploy.options import option

# tokenizer.ggml.token_type values (llama.cpp llama_token_type / gguf.TokenType)
TOKEN_TYPE_NAMES = {0: "undefined", 1: "normal", 2: "unknown", 3: "control", 4: "user_defined",
                    5: "unused", 6: "byte"}

SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}

# arrays too long to show in full; inspect shows their length
_LONG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges")


@dataclass
class InspectConfig:
    """Options of ``cllama-deploy inspect``."""

    model: Path = option(help="GGUF file.", argument=True, metavar="MODEL")


@dataclass
class GGUFInfo:
    """Everything ``inspect`` shows; ``to_dict()`` is the --json output."""

    path: str
    size_bytes: int
    metadata: dict[str, Any]
    tensors: list[dict]
    vocab: dict
    chat_template: str | None
    n_params: int
    bits_per_weight: float
    tensor_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def field_value(f) -> Any:
    """A GGUFReader field as a Python value (str, int, float, bool or list of those)."""
    import gguf

    vt = gguf.GGUFValueType
    kind = f.types[0] if f.types else None
    if kind == vt.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    if kind == vt.ARRAY:
        sub = f.types[-1]
        if sub == vt.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]].tolist()[0]
    return bool(value) if kind == vt.BOOL else value


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All key/values of a GGUF, arrays included in full."""
    reader = _open(Path(path))
    return {name: field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise InputError(f"MODEL {path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InputError(f"MODEL {path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file fails in many ways
        raise InputError(f"MODEL {path}: unreadable GGUF ({type(exc).__name__}: {exc}); "
                         "the file is truncated or corrupt, write it again") from exc


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Metadata, tensors and a vocabulary summary of a GGUF file.

    Raises:
        InputError: the file is missing or not a readable GGUF.
    """
    path = Path(path)
    reader = _open(path)
    meta: dict[str, Any] = {}
    full: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field_value(f)
        full[name] = value
        if name in _LONG_ARRAYS:
            meta[name] = f"[{len(value)} items]"
        elif name == "tokenizer.chat_template":
            meta[name] = f"[{len(value)} characters]"
        else:
            meta[name] = value
    tensors = []
    counts: dict[str, int] = {}
    n_el = n_bytes = 0
    for t in reader.tensors:
        tname = t.tensor_type.name
        tensors.append({"name": t.name, "shape": [int(x) for x in t.shape], "type": tname,
                        "n_bytes": int(t.n_bytes)})
        counts[tname] = counts.get(tname, 0) + 1
        n_el += int(t.n_elements)
        n_bytes += int(t.n_bytes)
    tokens = full.get("tokenizer.ggml.tokens") or []
    types = full.get("tokenizer.ggml.token_type") or []
    by_type: dict[str, int] = {}
    for ty in types:
        key = TOKEN_TYPE_NAMES.get(int(ty), str(ty))
        by_type[key] = by_type.get(key, 0) + 1
    specials = {}
    for kind, key in SPECIAL_KEYS.items():
        if key in full:
            tid = int(full[key])
            specials[kind] = {"id": tid, "piece": tokens[tid] if 0 <= tid < len(tokens) else None}
    vocab = {
        "model": full.get("tokenizer.ggml.model"),
        "pre": full.get("tokenizer.ggml.pre"),
        "size": len(tokens),
        "by_type": by_type,
        "specials": specials,
        "add_bos": full.get("tokenizer.ggml.add_bos_token"),
        "add_eos": full.get("tokenizer.ggml.add_eos_token"),
    }
    return GGUFInfo(
        path=str(path), size_bytes=path.stat().st_size, metadata=meta, tensors=tensors, vocab=vocab,
        chat_template=full.get("tokenizer.chat_template"), n_params=n_el,
        bits_per_weight=(8.0 * n_bytes / n_el) if n_el else 0.0, tensor_types=counts,
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def render(info: GGUFInfo, console, show_tensors: bool = True) -> None:
    """Print ``info`` as Rich tables."""
    from rich.table import Table

    console.print(f"[bold]{info.path}[/bold]  {_size(info.size_bytes)}, {info.n_params:,} parameters, "
                  f"{info.bits_per_weight:.2f} bits per weight")
    meta = Table(title="metadata", show_lines=False)
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for k, v in info.metadata.items():
        meta.add_row(k, str(v))
    console.print(meta)
    if show_tensors:
        tt = Table(title=f"tensors ({len(info.tensors)})")
        for col in ("name", "shape", "type", "size"):
            tt.add_column(col, justify="right" if col == "size" else "left")
        for t in info.tensors:
            tt.add_row(t["name"], "×".join(map(str, t["shape"])), t["type"], _size(t["n_bytes"]))
        console.print(tt)
    types = Table(title="tensor types")
    types.add_column("type")
    types.add_column("tensors", justify="right")
    for k, v in sorted(info.tensor_types.items()):
        types.add_row(k, str(v))
    console.print(types)
    v = info.vocab
    vt = Table(title=f"vocabulary ({v['size']} tokens, model {v['model']}, pre {v['pre']})")
    vt.add_column("item")
    vt.add_column("value")
    for k, n in sorted(v["by_type"].items()):
        vt.add_row(f"{k} tokens", str(n))
    for kind, s in v["specials"].items():
        vt.add_row(f"{kind} id", f"{s['id']} ({s['piece']!r})")
    vt.add_row("add_bos", str(v["add_bos"]))
    vt.add_row("add_eos", str(v["add_eos"]))
    console.print(vt)
    if info.chat_template:
        console.print("[bold]chat template[/bold]")
        console.print(info.chat_template, markup=False, highlight=False)
    else:
        console.print("[bold]chat template[/bold]: none")
