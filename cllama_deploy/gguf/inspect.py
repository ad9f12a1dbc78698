"""Read a GGUF's metadata, tensor table and vocabulary summary (``cllama-deploy inspect``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cllama_deploy.gguf import keys
from cllama_deploy.options import option


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


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Metadata, tensors and a vocabulary summary of a GGUF file.

    Raises:
        InputError: the file is missing or not a readable GGUF.
    """
    from cllama_deploy.gguf.reader import open_gguf, read_fields, weight_totals

    path = Path(path)
    reader = open_gguf(path, "MODEL")
    full = read_fields(reader)
    meta: dict[str, Any] = {}
    for name, value in full.items():
        if name in keys.LONG_ARRAYS:
            meta[name] = f"[{len(value)} items]"
        elif name == keys.CHAT_TEMPLATE:
            meta[name] = f"[{len(value)} characters]"
        else:
            meta[name] = value
    tensors = [{"name": t.name, "shape": [int(x) for x in t.shape], "type": t.tensor_type.name,
                "n_bytes": int(t.n_bytes)} for t in reader.tensors]
    totals = weight_totals(reader)
    tokens = full.get(keys.TOKENS) or []
    by_type: dict[str, int] = {}
    for ty in full.get(keys.TOKEN_TYPES) or []:
        name = keys.TOKEN_TYPE_NAMES.get(int(ty), str(ty))
        by_type[name] = by_type.get(name, 0) + 1
    specials = {}
    for kind in ("bos", "eos", "unk", "pad"):
        key = keys.SPECIAL_ID_KEYS[kind]
        if key in full:
            tid = int(full[key])
            specials[kind] = {"id": tid, "piece": tokens[tid] if 0 <= tid < len(tokens) else None}
    vocab = {
        "model": full.get(keys.TOKENIZER_MODEL),
        "pre": full.get(keys.TOKENIZER_PRE),
        "size": len(tokens),
        "by_type": by_type,
        "specials": specials,
        "add_bos": full.get(keys.ADD_SPECIAL_KEYS["bos"]),
        "add_eos": full.get(keys.ADD_SPECIAL_KEYS["eos"]),
    }
    return GGUFInfo(
        path=str(path), size_bytes=path.stat().st_size, metadata=meta, tensors=tensors, vocab=vocab,
        chat_template=full.get(keys.CHAT_TEMPLATE), n_params=totals.n_params,
        bits_per_weight=totals.bits_per_weight, tensor_types=totals.type_counts,
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
