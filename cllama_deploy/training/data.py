"""Training data: pre-training blocks from raw text and masked instruction examples.

Both kinds are tokenized once per input file and cached under ``data_cache_dir`` in a directory whose
name is a hash of everything the result depends on (the file's content, the tokenizer files and the
options), so changing any of them re-tokenizes that file and only that file. Tokenization runs through
``datasets.Dataset.map`` with ``preprocessing_num_workers`` processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cllama_deploy.errors import InputError, TokenizerError
from cllama_deploy.files import atomic_dir, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_VERSION = 1  # bump when the cached format or the tokenization rules change


# ------------------------------------------------------------------------------------ tokenizer

_FINGERPRINT_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json")


class TextTokenizer:
    """What training needs from a tokenizer: pieces, ids without special tokens, BOS/EOS/PAD ids.

    The pieces and the size come from the SentencePiece model and the HF files' added tokens
    (:func:`cllama_deploy.tokenizer.hf.tokenizer_settings`), without importing transformers, so the
    vocabulary is checked before training loads anything heavy. Ids come from the SentencePiece-exact HF
    tokenizer (:func:`cllama_deploy.tokenizer.hf.load_tokenizer`), loaded on first use. It pickles by path,
    so ``datasets.map`` workers reload it.

    Raises:
        TokenizerError: no such path, no ``tokenizer.model``, unreadable tokenizer files.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise TokenizerError(f"tokenizer {self.path}: no such file or directory")
        self._hf = None
        self._load_light()
        self.fingerprint = self._fingerprint()

    # pickling: reload in the worker instead of shipping the native objects
    def __getstate__(self):
        return {"path": self.path, "fingerprint": self.fingerprint}

    def __setstate__(self, state):
        self.path = state["path"]
        self.fingerprint = state["fingerprint"]
        self._hf = None
        self._load_light()

    def _load_light(self) -> None:
        from cllama_deploy.tokenizer.hf import tokenizer_settings
        from cllama_deploy.tokenizer.spm import processor

        settings = tokenizer_settings(self.path)
        self.model_file: Path = Path(settings["sp_model"])
        self._added: dict[str, int] = dict(settings["added_tokens"])
        self._sp = processor(self.model_file)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.iterdir() if p.is_file() and p.name in _FINGERPRINT_FILES)
        for p in files:
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
        h.update(b"hf")  # kept so caches written before the pieces were read without transformers still match
        return h.hexdigest()

    @property
    def hf(self):
        """The SentencePiece-exact HF tokenizer (imports transformers on first use)."""
        if self._hf is None:
            from cllama_deploy.tokenizer.hf import load_tokenizer

            target = self.path
            if target.is_dir() and not (target / "tokenizer_config.json").is_file():
                # A bare directory with only tokenizer.model: load the file, so BOS/EOS/UNK come from the
                # SentencePiece model (a directory without tokenizer_config.json has no special tokens).
                target = self.model_file
            hf = load_tokenizer(target)
            if hf.bos_token_id is None or hf.eos_token_id is None:
                raise TokenizerError(f"tokenizer {self.path}: no BOS/EOS token defined (training adds BOS to every "
                                     f"example and EOS after every response)")
            if len(hf) != len(self):
                raise TokenizerError(f"tokenizer {self.path}: transformers loads {len(hf)} tokens but the "
                                     f"SentencePiece model and added tokens make {len(self)}; rewrite the HF files "
                                     f"with `cllama-deploy tokenizer merge` (or delete tokenizer_config.json)")
            self._hf = hf
        return self._hf

    def __len__(self) -> int:
        return self._sp.get_piece_size() + len(self._added)

    @property
    def bos_id(self) -> int:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.hf.pad_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def pieces(self) -> list[str]:
        """Every piece in id order (SentencePiece spelling: '▁' for a space, '<0x0A>' for bytes), then the
        added tokens."""
        sp = self._sp
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())] + sorted(self._added, key=self._added.get)

    def special_ids(self) -> set[int]:
        """Ids of control/special tokens (no text of their own)."""
        return set(self.hf.all_special_ids)


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """Load the training tokenizer (a directory with tokenizer.model / HF files, or a .model file)."""
    return TextTokenizer(path)


# ------------------------------------------------------------------------------------ cache

@dataclass
class DataResult:
    """Tokenized data: the train / eval datasets and what happened to the cache."""

    train: Any
    eval: Any | None
    files: list[Path]
    cache_hits: int = 0
    cache_misses: int = 0
    examples: int = 0
    tokens: int = 0
    dropped: int = 0
    cache_dirs: list[Path] = field(default_factory=list)


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _cached(cache_root: Path, kind: str, src: Path, parts: dict, build: Callable[[], Any]):
    """Load ``kind``-<hash> from the cache, or build it and save it atomically. Returns (ds, hit, dir)."""
    from datasets import load_from_disk

    key = _cache_key({"v": CACHE_VERSION, "kind": kind, "file_sha256": sha256_file(src), **parts})
    target = cache_root / f"{kind}-{src.stem[:40]}-{key}"
    if (target / "cllama_cache.json").is_file():
        try:
            return load_from_disk(str(target)), True, target
        except Exception as exc:  # a damaged cache entry is rebuilt, never trusted
            log.warning("cache %s unreadable (%s); rebuilding", target, exc)
    ds = build()
    with atomic_dir(target) as tmp:
        ds.save_to_disk(str(tmp))
        write_text_atomic(tmp / "cllama_cache.json", json.dumps(
            {"source": str(src), "key": key, "rows": len(ds), **parts}, indent=1, sort_keys=True))
    return load_from_disk(str(target)), False, target


def _split(ds, pct: float, seed: int, what: str):
    """Hold out ``pct`` percent of the rows (at least one when pct > 0)."""
    if pct <= 0:
        return ds, None
    n = len(ds)
    n_eval = max(1, round(n * pct / 100.0))
    if n_eval >= n:
        raise InputError(f"only {n} {what}: too few to hold out {pct}% for validation; add data or lower "
                         f"--validation_split_percentage")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _map(ds, fn, workers: int | None, desc: str):
    return ds.map(fn, batched=True, num_proc=workers if workers and workers > 1 and len(ds) > 1 else None,
                  remove_columns=ds.column_names, load_from_cache_file=False, desc=desc)


# ------------------------------------------------------------------------------------ pre-training

class _PTTokenize:
    def __init__(self, tok: TextTokenizer, add_eos: bool):
        self.tok, self.add_eos = tok, add_eos

    def __call__(self, batch):
        bos, eos = self.tok.bos_id, self.tok.eos_id
        out = []
        for ids in self.tok.encode(batch["text"]):
            out.append([bos] + ids + ([eos] if self.add_eos else []))
        return {"input_ids": out}


def pt_files(dataset_dir: str | Path) -> list[Path]:
    files = sorted(p for p in Path(dataset_dir).rglob("*.txt") if p.is_file())
    if not files:
        raise InputError(f"--dataset_dir {dataset_dir}: no .txt files found (pre-training reads one example "
                         f"per line from .txt files)")
    return files


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from exc
    return [ln for ln in text.splitlines() if ln.strip()]


def build_pt_blocks(path: Path, tok: TextTokenizer, block_size: int, add_eos: bool,
                    workers: int | None = None):
    """One file → a dataset of ``block_size`` token blocks (BOS per line, concatenated, remainder dropped)."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Dataset

    lines = _read_lines(path)
    ds = Dataset.from_dict({"text": lines})
    ds = _map(ds, _PTTokenize(tok, add_eos), workers, f"tokenizing {path.name}")
    col = ds.data.column("input_ids")
    flat = pc.list_flatten(col).to_numpy() if len(ds) else np.zeros(0, dtype=np.int64)
    n_blocks = len(flat) // block_size
    blocks = np.asarray(flat[: n_blocks * block_size], dtype=np.int32).reshape(n_blocks, block_size)
    return Dataset.from_dict({"input_ids": blocks})


def load_pt_data(cfg, tok: TextTokenizer) -> DataResult:
    """Tokenized, blocked, cached and split pre-training data for a :class:`PTConfig`."""
    from datasets import concatenate_datasets

    files = pt_files(cfg.dataset_dir)
    parts = {"tokenizer": tok.fingerprint, "block_size": cfg.block_size, "add_eos": cfg.add_eos}
    result = DataResult(train=None, eval=None, files=files)
    sets = []
    for path in files:
        ds, hit, where = _cached(cfg.cache_dir, "pt", path, parts, lambda p=path: build_pt_blocks(
            p, tok, cfg.block_size, cfg.add_eos, cfg.preprocessing_num_workers))
        result.cache_hits += hit
        result.cache_misses += not hit
        result.cache_dirs.append(where)
        if len(ds):
            sets.append(ds)
    if not sets:
        raise InputError(f"--dataset_dir {cfg.dataset_dir}: the text is shorter than one block of "
                         f"{cfg.block_size} tokens; add text or lower --block_size")
    full = concatenate_datasets(sets) if len(sets) > 1 else sets[0]
    result.examples = len(full)
    result.tokens = len(full) * cfg.block_size
    result.train, result.eval = _split(full, cfg.validation_split_percentage, cfg.seed,
                                       f"blocks of {cfg.block_size} tokens")
    return result


class PTCollator:
    """Stack fixed-size blocks; labels are the inputs (the model shifts them)."""

    def __call__(self, features):
        import torch

        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ------------------------------------------------------------------------------------ SFT

def sft_files(dataset_dir: str | Path) -> list[Path]:
    files = sorted(p for p in Path(dataset_dir).rglob("*")
                   if p.is_file() and p.suffix in (".json", ".jsonl"))
    if not files:
        raise InputError(f"--dataset_dir {dataset_dir}: no .json or .jsonl files found (instruction data in "
                         f"Alpaca format: instruction, input, output)")
    return files


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_alpaca(path: Path) -> list[tuple[int, dict]]:
    """Records of an Alpaca JSON array or JSONL file as (line number, record), validated.

    Raises:
        InputError: malformed JSON or a record without a string ``instruction``/``output``; the message
            names the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from exc
    dec = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        pos = text.index("[") + 1
        n = len(text)

        def skip_ws(i):
            while i < n and text[i] in " \t\r\n":
                i += 1
            return i

        pos = skip_ws(pos)
        if pos < n and text[pos] == "]":
            pos += 1
        else:
            while True:
                try:
                    obj, end = dec.raw_decode(text, pos)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
                records.append((_line_of(text, pos), obj))
                pos = skip_ws(end)
                if pos < n and text[pos] == ",":
                    pos = skip_ws(pos + 1)
                    continue
                if pos < n and text[pos] == "]":
                    pos += 1
                    break
                raise InputError(f"{path}:{_line_of(text, pos)}: invalid JSON (expected ',' or ']' between "
                                 f"records)")
        if text[pos:].strip():
            raise InputError(f"{path}:{_line_of(text, pos)}: unexpected text after the JSON array")
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{i}: invalid JSON line ({exc.msg}); expected one Alpaca record "
                                 f"per line (JSONL) or a JSON array") from exc
    out = []
    for line, rec in records:
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{line}: record is {type(rec).__name__}, expected an object with "
                             f"instruction/input/output")
        for key in ("instruction", "output"):
            if key not in rec:
                raise InputError(f"{path}:{line}: record has no '{key}' (Alpaca records need instruction "
                                 f"and output; input is optional)")
        for key in ("instruction", "input", "output"):
            if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                raise InputError(f"{path}:{line}: '{key}' must be a string, got {type(rec[key]).__name__}")
        if not rec["instruction"].strip():
            raise InputError(f"{path}:{line}: 'instruction' is empty")
        out.append((line, rec))
    return out


class _SFTTokenize:
    def __init__(self, tok: TextTokenizer, max_len: int):
        self.tok, self.max_len = tok, max_len

    def __call__(self, batch):
        bos, eos = self.tok.bos_id, self.tok.eos_id
        prompts = self.tok.encode(batch["prompt"])
        responses = self.tok.encode(batch["response"])
        ids_out, labels_out = [], []
        for p, r in zip(prompts, responses):
            src = [bos] + p
            tgt = r + [eos]
            ids = (src + tgt)[: self.max_len]
            labels = ([IGNORE_INDEX] * len(src) + tgt)[: self.max_len]
            ids_out.append(ids)
            labels_out.append(labels)
        return {"input_ids": ids_out, "labels": labels_out}


def build_sft_examples(path: Path, tok: TextTokenizer, max_seq_length: int, template: str,
                       system_prompt: str | None, workers: int | None = None):
    """One Alpaca file → a dataset of input_ids / labels (-100 over the prompt), truncated."""
    from datasets import Dataset

    from cllama_deploy.prompts import FORMATS

    recs = read_alpaca(path)
    fmt = FORMATS[template]
    prompts = [fmt.build(r["instruction"], r.get("input") or "", system_prompt) for _, r in recs]
    responses = [r["output"] for _, r in recs]
    ds = Dataset.from_dict({"prompt": prompts, "response": responses})
    return _map(ds, _SFTTokenize(tok, max_seq_length), workers, f"tokenizing {path.name}")


def _has_target(example) -> bool:
    return any(x != IGNORE_INDEX for x in example["labels"])


def load_sft_data(cfg, tok: TextTokenizer) -> DataResult:
    """Tokenized, masked, cached and split instruction data for an :class:`SFTConfig`."""
    from datasets import concatenate_datasets

    def load(files):
        parts = {"tokenizer": tok.fingerprint, "max_seq_length": cfg.max_seq_length,
                 "template": cfg.prompt_template, "system_prompt": cfg.system_prompt}
        sets, hits, misses, dirs = [], 0, 0, []
        for path in files:
            ds, hit, where = _cached(cfg.cache_dir, "sft", path, parts, lambda p=path: build_sft_examples(
                p, tok, cfg.max_seq_length, cfg.prompt_template, cfg.system_prompt,
                cfg.preprocessing_num_workers))
            hits += hit
            misses += not hit
            dirs.append(where)
            if len(ds):
                sets.append(ds)
        if not sets:
            return None, hits, misses, dirs, 0
        full = concatenate_datasets(sets) if len(sets) > 1 else sets[0]
        before = len(full)
        # A prompt longer than max_seq_length leaves nothing to learn from: drop it (counted, reported).
        full = full.filter(_has_target, load_from_cache_file=False)
        return full, hits, misses, dirs, before - len(full)

    files = sft_files(cfg.dataset_dir)
    full, hits, misses, dirs, dropped = load(files)
    if full is None or len(full) == 0:
        raise InputError(f"--dataset_dir {cfg.dataset_dir}: no usable instruction records (all empty or all "
                         f"prompts longer than --max_seq_length {cfg.max_seq_length})")
    result = DataResult(train=None, eval=None, files=files, cache_hits=hits, cache_misses=misses,
                        cache_dirs=dirs, dropped=dropped)
    result.examples = len(full)
    result.tokens = sum(len(x) for x in full["input_ids"])
    if cfg.validation_file:
        ev, h2, m2, d2, dropped2 = load([Path(cfg.validation_file)])
        if ev is None or len(ev) == 0:
            raise InputError(f"--validation_file {cfg.validation_file}: no usable records")
        result.cache_hits += h2
        result.cache_misses += m2
        result.cache_dirs += d2
        result.train, result.eval = full, ev
    else:
        result.train, result.eval = _split(full, cfg.validation_split_percentage, cfg.seed,
                                           "instruction examples")
    return result


class SFTCollator:
    """Right-pad a batch to its longest example; labels padded with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
