"""Where an adapter comes from: the record ``cllama-deploy train`` writes, and whether two paths hold the
same adapter or model.

``train pt|sft`` writes ``{stage}_training_config.json`` into its ``--output_dir``, next to the final
``{stage}_lora_model/`` and the ``checkpoint-N/`` folders: the options of the run, among them the base
(``model_name_or_path``), the adapters merged into it before training (``lora``, in order) and the
adapter whose training it continued (``peft_path``). :func:`training_record` finds it for an adapter
directory (inside the directory first, for copies that carry it along), so the merge can tell the order
the adapter needs from the order it was given.

Only small files are read, except :func:`same_adapter`, which hashes two adapter weight files when two
different paths must be compared.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

RECORD_SUFFIX = "_training_config.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")


@dataclass(frozen=True)
class TrainingRecord:
    """How ``cllama-deploy train`` made an adapter (read from ``{stage}_training_config.json``).

    Paths are as the run was given them, resolved against the directory the run started in when that can
    be told from the recorded ``output_dir``; a path that cannot be resolved is None.
    """

    path: Path  # the record file
    stage: str  # "pt" or "sft"
    base: Path | None  # model_name_or_path
    earlier: tuple[Path | None, ...]  # --lora: merged into the base, in this order, before training
    continued: Path | None  # --peft_path: the adapter this run continued training
    earlier_as_given: tuple[str, ...] = ()  # --lora as the run was given it (for messages)

    def earlier_names(self) -> list[str]:
        return [str(p) if p is not None else raw for p, raw in zip(self.earlier, self.earlier_as_given)]


def _record_file(adapter_dir: Path) -> Path | None:
    inside = sorted(adapter_dir.glob(f"*{RECORD_SUFFIX}"))
    if len(inside) == 1:
        return inside[0]
    parent = adapter_dir.parent
    m = re.fullmatch(r"(\w+)_lora_model", adapter_dir.name)
    if m and (parent / f"{m.group(1)}{RECORD_SUFFIX}").is_file():
        return parent / f"{m.group(1)}{RECORD_SUFFIX}"
    if _CHECKPOINT_DIR.fullmatch(adapter_dir.name):  # checkpoint-N/ of the run that wrote the record
        beside = sorted(parent.glob(f"*{RECORD_SUFFIX}"))
        if len(beside) == 1:
            return beside[0]
    return None


def _start_dir(recorded_out: str | None, actual_out: Path) -> Path | None:
    """The directory the training run started in, from its (maybe relative) recorded output_dir and the
    directory the record was found in."""
    if not recorded_out:
        return None
    rec = Path(recorded_out)
    if rec.is_absolute():
        return None  # relative paths beside it were relative to a directory we cannot know
    parts = rec.parts
    actual = actual_out.resolve()
    if len(actual.parts) > len(parts) and actual.parts[-len(parts):] == parts:
        return Path(*actual.parts[:-len(parts)])
    return None


def training_record(adapter_dir: str | Path) -> TrainingRecord | None:
    """The training record of an adapter directory, or None (not made by ``cllama-deploy train``, or the
    record was not copied along). An unreadable record counts as none: it only adds checks."""
    adapter_dir = Path(adapter_dir)
    file = _record_file(adapter_dir)
    if file is None:
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    start = _start_dir(data.get("output_dir"), adapter_dir.parent if file.parent == adapter_dir else file.parent)

    def resolve(value) -> Path | None:
        if not value or not isinstance(value, str):
            return None
        p = Path(value)
        if p.is_absolute():
            return p
        return (start / p) if start is not None else None

    earlier = data.get("lora") or []
    if isinstance(earlier, str):
        earlier = [earlier]
    earlier = [p for p in earlier if isinstance(p, str)]
    return TrainingRecord(path=file, stage=file.name[: -len(RECORD_SUFFIX)], base=resolve(data.get("model_name_or_path")),
                          earlier=tuple(resolve(p) for p in earlier), continued=resolve(data.get("peft_path")),
                          earlier_as_given=tuple(earlier))


def _weights(adapter_dir: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def same_adapter(a: Path | None, b: Path) -> bool | None:
    """True/False when ``a`` and ``b`` surely are / are not the same adapter, None when it cannot be told
    (``a`` unknown or gone). Different paths are compared by their config and weights (SHA256)."""
    from cllama_deploy.files import sha256_file

    if a is None or not a.is_dir():
        return None
    if a.resolve() == b.resolve():
        return True
    wa, wb = _weights(a), _weights(b)
    if wa is None or wb is None:
        return None
    if wa.name != wb.name or wa.stat().st_size != wb.stat().st_size:
        return False
    if _json(a / "adapter_config.json") != _json(b / "adapter_config.json"):
        return False
    return sha256_file(wa) == sha256_file(wb)


def same_model(a: Path | None, b: Path) -> bool | None:
    """True/False when HF model directories ``a`` and ``b`` surely are / are not the same model, None when
    it cannot be told. Different configs (``vocab_size``, sizes, ...) are different models; equal configs
    and weight files of the same names and sizes count as a copy; the data is not hashed (it can be tens of
    GB), and equal configs with another file layout (e.g. re-sharded) cannot be told apart."""
    if a is None or not (a / "config.json").is_file():
        return None
    if a.resolve() == b.resolve():
        return True
    ca, cb = _json(a / "config.json"), _json(b / "config.json")
    if ca is None or cb is None:
        return None
    ignore = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
    if {k: v for k, v in ca.items() if k not in ignore} != {k: v for k, v in cb.items() if k not in ignore}:
        return False

    def weights(d: Path) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in d.iterdir()
                if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))}

    return True if weights(a) == weights(b) else None


def model_vocab(directory: Path | None) -> int | None:
    """``vocab_size`` of an HF model directory's config.json, or None."""
    if directory is None:
        return None
    cfg = _json(directory / "config.json")
    value = (cfg or {}).get("vocab_size")
    return value if isinstance(value, int) else None


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
