"""Streaming LoRA merge: a base HF model plus PEFT LoRA adapters, applied in order.

:func:`merged_source` plans the merge from shapes alone (checking every invariant before any tensor is
read) and returns a :class:`~cllama_deploy.checkpoint.TensorSource` whose ``get(name)`` reads one base
tensor and applies the adapters to it in order: a full tensor saved through ``modules_to_save`` replaces
the weight (that is how the vocabulary grows), otherwise ``W += scale * B @ A`` in float32. The GGUF
converter consumes that source directly; :func:`merge` writes it out as an HF directory, tensor by
tensor, so peak memory stays near the largest tensor plus the adapters.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cllama_deploy.checkpoint.hf import HFCheckpoint, open_hf
from cllama_deploy.checkpoint.peft import LoraAdapter, open_adapter
from cllama_deploy.checkpoint.safetensors_io import ShardWriter, itemsize
from cllama_deploy.checkpoint.validate import (
    EMBED,
    LM_HEAD,
    VOCAB_TENSORS,
    VocabReport,
    check_adapter_order,
    check_adapter_tokenizer,
    check_base_vocab,
    check_config,
    check_full_shape,
    check_lora_shape,
    check_merged_vocab,
    check_vocab_grows,
    count_tokenizer,
)
from cllama_deploy.errors import ConfigError
from cllama_deploy.files import atomic_dir, check_replaceable_dir
from cllama_deploy.tokenizer.hf import DEFAULT_HF_TARGET, HF_TARGET_HELP, HF_TARGETS


@dataclass(frozen=True)
class _Op:
    adapter: int  # index into MergedSource.adapters
    kind: str  # "full": replace the weight; "lora": add scale * B @ A
    target: str  # the tensor name inside the adapter's plan


class MergedSource:
    """A base checkpoint with LoRA adapters applied lazily, tensor by tensor (a :class:`TensorSource`).

    Attributes:
        config: the base config with ``vocab_size`` (and ``tie_word_embeddings`` when an adapter gives
            the tied output layer its own weights) updated.
        tokenizer_dir: the last adapter directory holding ``tokenizer.model``, else the base's.
        base, adapters: the opened inputs.
        vocab: the vocabulary sizes checked before the merge (:class:`VocabReport`).
    """

    def __init__(self, base: HFCheckpoint, adapters: Sequence[LoraAdapter], *, check_tokenizer: bool = True,
                 check_order: bool = True):
        self.base = base
        self.adapters = list(adapters)
        check_config(base.config, base.path / "config.json")
        self._names = base.names()
        if base.config.get("tie_word_embeddings") and LM_HEAD in self._names:
            # transformers ties the output layer to the embeddings and ignores a saved copy; so do we
            self._names.remove(LM_HEAD)
        shapes: dict[str, tuple[int, ...]] = {n: base.shape(n) for n in self._names}
        check_base_vocab(base.config, shapes, base.path)
        origin = {n: f"the base {base.path}" for n in self._names}
        self._ops: dict[str, list[_Op]] = {n: [] for n in self._names}
        self._read_from: dict[str, str] = {}
        tied = LM_HEAD not in shapes
        untied = False
        grown_by: dict[str, Path] = {}  # vocabulary tensor -> the adapter that last replaced it whole
        rows_before: list[int] = []  # vocabulary rows just before each adapter
        rows_after: list[int] = []
        for i, ad in enumerate(self.adapters):
            rows_before.append(shapes[EMBED][0])
            if tied and ad.full_kind.get(LM_HEAD) == "full":
                # A trained copy of the output layer (modules_to_save): from this adapter on it has its own
                # weights, starting from the embeddings as the earlier adapters left them. PEFT's
                # merge_and_unload unties the same way.
                tied, untied = False, True
                shapes[LM_HEAD] = shapes[EMBED]
                origin[LM_HEAD] = f"{origin[EMBED]} (tied embeddings)"
                self._ops[LM_HEAD] = list(self._ops[EMBED])
                self._read_from[LM_HEAD] = EMBED
                self._names.append(LM_HEAD)
            # While tied, PEFT merges LoRA on lm_head into the one shared matrix (and saves that matrix as
            # lm_head's base_layer): both go to the embeddings, which the output layer keeps sharing.
            for target, key in ad.full.items():
                shape = ad.full_shape(target)
                d = EMBED if tied and target == LM_HEAD else target
                check_full_shape(ad.weights_file, key, target, shape, shapes.get(d), origin.get(d, ""))
                if check_order and d in VOCAB_TENSORS:
                    check_vocab_grows(ad.path, key, d, shape[0], shapes[d][0], grown_by.get(d))
                    grown_by[d] = ad.path
                self._ops[d].append(_Op(i, "full", target))
                shapes[d] = shape
                origin[d] = str(ad.weights_file)
            for target, pair in ad.lora.items():
                d = EMBED if tied and target == LM_HEAD else target
                check_lora_shape(ad.weights_file, pair.a_key, pair.b_key, target, ad.delta_shape(target),
                                 shapes.get(d), origin.get(d, ""), ad.fan_in_fan_out)
                self._ops[d].append(_Op(i, "lora", target))
            rows_after.append(shapes[EMBED][0])
        self._shapes = shapes
        if check_order:
            check_adapter_order(base.path, self.adapters, rows_before)

        self.tokenizer_dir = base.tokenizer_dir
        carriers = [i for i, ad in enumerate(self.adapters) if ad.tokenizer_dir is not None]
        if carriers:
            self.tokenizer_dir = self.adapters[carriers[-1]].tokenizer_dir
        if check_order and check_tokenizer:
            for i in carriers[:-1]:  # the last tokenizer is compared with the merged vocabulary below
                check_adapter_tokenizer(self.adapters[i].path, count_tokenizer(self.adapters[i].tokenizer_dir),
                                        rows_after[i])
        tokenizer = count_tokenizer(self.tokenizer_dir) if check_tokenizer and self.tokenizer_dir else None
        embed_rows = shapes[EMBED][0]
        self.vocab = VocabReport(
            tokenizer=tokenizer,
            config_vocab_size=embed_rows,
            embed_rows=embed_rows,
            lm_head_rows=None if tied else shapes[LM_HEAD][0],
            embed_from=origin[EMBED],
            lm_head_from=origin.get(LM_HEAD, origin[EMBED]),
        )
        check_merged_vocab(self.vocab)
        self.config = copy.deepcopy(base.config)
        self.config["vocab_size"] = embed_rows
        if untied:
            self.config["tie_word_embeddings"] = False

    # -- TensorSource ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            return self.base.shape(name)  # raises, naming the tensor
        return self._shapes[name]

    def changed(self, name: str) -> list[str]:
        """How the adapters change one tensor, e.g. ``["lora 1", "full 2"]`` (1-based adapter numbers)."""
        return [f"{op.kind} {op.adapter + 1}" for op in self._ops.get(name, [])]

    def dtype(self, name: str) -> str:
        """Storage dtype of the base tensor, or ``F32`` once an adapter changed it."""
        return "F32" if self._ops.get(name) else self.base.dtype(self._read_from.get(name, name))

    def get(self, name: str) -> np.ndarray:
        """The merged tensor: the base's storage (float32/float16 view) if unchanged, else float32."""
        ops = self._ops.get(name)
        if ops is None:
            return self.base.get(name)  # raises, naming the tensor
        # a full replacement discards everything before it: start from the last one
        start = max((k for k, op in enumerate(ops) if op.kind == "full"), default=-1)
        if start >= 0:
            op = ops[start]
            weight = self.adapters[op.adapter].full_tensor(op.target)
        else:
            weight = self.base.get(self._read_from.get(name, name))
        owned = False
        for op in ops[start + 1:]:
            delta = self.adapters[op.adapter].delta(op.target, weight.shape)
            if not owned and delta.flags.c_contiguous:
                # add the (f16/f32, memory-mapped) base straight into the fresh f32 delta: no widened copy
                np.add(delta, weight, out=delta)
                weight = delta
            else:
                if not owned:
                    weight = np.array(weight, dtype=np.float32)
                weight += delta
            owned = True
        return weight

    def __repr__(self) -> str:
        return f"MergedSource(base={str(self.base.path)!r}, adapters={[str(a.path) for a in self.adapters]})"


def merged_source(base_dir: str | Path, lora_dirs: Sequence[str | Path], *,
                  check_tokenizer: bool = True, check_order: bool = True) -> MergedSource:
    """Open a base model and LoRA adapters as one lazily merged :class:`TensorSource`.

    Every invariant is checked here, from shapes and small files only: head counts, config
    ``vocab_size`` = embedding rows = lm_head rows, adapter tensors against the (already merged) base
    shapes, and the tokenizer's size against the merged vocabulary.

    Args:
        base_dir: Hugging Face model directory.
        lora_dirs: PEFT LoRA adapter directories, applied in this order.
        check_tokenizer: compare the tokenizer (``tokenizer.model`` + added tokens) with the vocabulary.
        check_order: check that every adapter is applied to the model it was trained on (its training
            record, its claimed base, the vocabulary rows it saves and its tokenizer).

    Raises:
        CheckpointError / ShapeMismatchError / TokenizerError: a file is missing or malformed, or sizes
            disagree; the message names the file, the tensor and the fix.
    """
    base = open_hf(base_dir)
    adapters = [open_adapter(d) for d in lora_dirs]
    return MergedSource(base, adapters, check_tokenizer=check_tokenizer, check_order=check_order)


# -- writing an HF directory ---------------------------------------------------------------------------

DTYPES = ("auto", "float32", "float16", "bfloat16")
_STORAGE_TO_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}

# Tokenizer files of an HF directory: copied as they are from a tokenizer without tokenizer.model (else
# write_hf_tokenizer writes them, see copy_tokenizer_files); never mixed between directories.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")

# Written into every merge output; with it (and only files merge writes) --out may be replaced.
MERGE_MARKER = "cllama_merge.json"
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def is_merge_output(name: str) -> bool:
    """Whether a file name in a merge output directory is one that merge writes."""
    return (name in TOKENIZER_FILES or _SHARD.fullmatch(name) is not None
            or name in ("config.json", "generation_config.json", "model.safetensors.index.json", MERGE_MARKER))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, flag: str = "--shard-size") -> int:
    """``"5GB"``, ``"500MiB"`` or a byte count -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"{flag}: cannot read {value!r} as a size; use e.g. 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"{flag}: must be positive, got {value!r}")
    return size


@dataclass
class MergeConfig:
    """Options of ``cllama-deploy merge``."""

    base: Path = field(metadata={"help": "Hugging Face base model directory (config.json + weights)."})
    loras: list[Path] = field(metadata={"flag": "--lora", "help": "PEFT LoRA adapter directory; repeat to apply "
                                        "several in order (pre-training LoRA first, then the SFT LoRA)."})
    out: Path = field(metadata={"help": "Output directory for the merged HF model (replaced atomically)."})
    shard_size: str | int = field(default="5GB", metadata={"help": "Largest safetensors shard, e.g. 5GB."})
    dtype: str = field(default="auto", metadata={
        "help": "Output dtype: auto (the base's storage dtype), float32, float16 or bfloat16."})
    check_tokenizer: bool = field(default=True, metadata={"flag": "--no-check-tokenizer", "invert": True,
        "help": "Skip comparing the tokenizer's size with the merged vocabulary."})
    check_adapter_order: bool = field(default=True, metadata={"flag": "--no-check-adapter-order", "invert": True,
        "help": "Merge even if an adapter's training record, saved vocabulary or tokenizer says it was trained "
                "on another model than the one it is applied to (e.g. the adapters are in the wrong order)."})
    force: bool = field(default=False, metadata={
        "help": "Replace --out even if it holds files that merge did not write."})
    hf_target: str = field(default=DEFAULT_HF_TARGET, metadata={"help": HF_TARGET_HELP, "choices": HF_TARGETS})
    show_progress: bool = field(default=True, metadata={"help": "No progress bar.", "flag": ("--quiet", "-q"),
                                                        "invert": True})

    def __post_init__(self) -> None:
        if self.hf_target not in HF_TARGETS:
            raise ConfigError(f"--hf-target {self.hf_target!r}: choose one of {', '.join(HF_TARGETS)}")
        self.base = Path(self.base)
        self.loras = [Path(p) for p in self.loras]
        self.out = Path(self.out)
        if not self.base.is_dir():
            raise ConfigError(f"--base: {self.base} is not a directory; pass a Hugging Face model directory")
        if not self.loras:
            raise ConfigError("--lora: give at least one LoRA adapter directory")
        for lora in self.loras:
            if not lora.is_dir():
                raise ConfigError(f"--lora: {lora} is not a directory; pass a PEFT adapter directory")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        self.shard_bytes = parse_size(self.shard_size)
        out = self.out.resolve()
        for flag, path in [("--base", self.base)] + [("--lora", p) for p in self.loras]:
            src = path.resolve()
            if out == src or out in src.parents or src in out.parents:
                raise ConfigError(f"--out: {self.out} overlaps the input {flag} {path}; choose another directory")
        check_replaceable_dir(self.out, "--out", is_merge_output, what="merge", marker=MERGE_MARKER,
                              force=self.force, force_flag="--force")


@dataclass
class MergeResult:
    """What :func:`merge` wrote."""

    out: Path
    shards: list[Path]
    tensors: int
    changed: int  # tensors an adapter modified or replaced
    vocab_size: int
    dtype: str
    tokenizer_from: Path | None
    vocab: VocabReport
    seconds: float


def _plan_shards(names: list[str], shapes: dict[str, tuple[int, ...]], limit: int, size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        nbytes = int(np.prod(shapes[name], dtype=np.int64)) * size
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_hf(source: MergedSource | HFCheckpoint, out_dir: Path, *, dtype: str, shard_bytes: int,
             show_progress: bool = True, base_dir: Path | None = None,
             hf_target: str = DEFAULT_HF_TARGET) -> list[Path]:
    """Write ``source`` into ``out_dir`` (an existing empty directory) as an HF model, tensor by tensor.

    Returns the weight files written. ``config.json`` gets ``vocab_size`` and the dtype (and the keys
    transformers 4.x reads, :func:`~cllama_deploy.hf_compat.portable_config`); the generation config of
    ``base_dir`` is copied (a minimal one written when it has none); the tokenizer files are written
    complete for ``hf_target`` from ``source.tokenizer_dir`` (:func:`copy_tokenizer_files`).
    """
    from cllama_deploy.progress import progress

    names = source.names()
    shapes = {n: tuple(source.shape(n)) for n in names}
    plan = _plan_shards(names, shapes, shard_bytes, itemsize(dtype))
    if len(plan) == 1:
        files = [out_dir / "model.safetensors"]
    else:
        files = [out_dir / f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    total = 0
    with (progress() if show_progress else _no_progress()) as bar:
        task = bar.add_task("merge", total=len(names)) if bar else None
        for file, shard in zip(files, plan):
            with open(file, "wb") as fh:
                writer = ShardWriter(fh, [(n, shapes[n]) for n in shard], dtype)
                for name in shard:
                    if bar:
                        bar.update(task, description=f"merge {name}")
                    writer.write(name, source.get(name))
                    if bar:
                        bar.advance(task)
                writer.close()
                total += writer.data_bytes
        if bar:
            bar.update(task, description="merge")
    if len(files) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f.name for f, shard in zip(files, plan) for n in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    from cllama_deploy.hf_compat import generation_config, portable_config

    config = portable_config(source.config, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    base_dir = base_dir or getattr(getattr(source, "base", source), "path", None)
    tok = copy_tokenizer_files(source.tokenizer_dir or base_dir, out_dir, target=hf_target)
    if base_dir is not None and (Path(base_dir) / "generation_config.json").is_file():
        shutil.copy(Path(base_dir) / "generation_config.json", out_dir / "generation_config.json")
    else:
        gen = generation_config(config, tok.pad_token_id if tok else None)
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return files


def copy_tokenizer_files(tokenizer_dir: Path | None, out_dir: Path, *, target: str = DEFAULT_HF_TARGET):
    """The tokenizer of every HF directory we write (merge's output, deploy --keep-hf), from ONE
    directory, never mixed between directories (they must agree).

    With a ``tokenizer.model`` the files are written complete for ``target`` whatever the directory
    carried (:func:`~cllama_deploy.tokenizer.hf.write_hf_tokenizer`; returns its info); without one
    (a tokenizer.json-only base) they are copied as they are (returns None)."""
    if tokenizer_dir is None:
        return None
    if (Path(tokenizer_dir) / "tokenizer.model").is_file():
        from cllama_deploy.tokenizer.hf import write_hf_tokenizer

        return write_hf_tokenizer(out_dir, tokenizer_dir, target=target)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return None


def resolve_dtype(source: MergedSource, dtype: str = "auto") -> str:
    """The output dtype: ``auto`` is the base's storage dtype (float32 for anything else)."""
    if dtype != "auto":
        return dtype
    return _STORAGE_TO_DTYPE.get(source.base.storage_dtype(), "float32")


def write_merged_dir(source: MergedSource, out: Path, *, dtype: str, shard_bytes: int,
                     show_progress: bool = True, hf_target: str = DEFAULT_HF_TARGET) -> list[Path]:
    """Write ``source`` as an HF model directory at ``out``, atomically (``out.partial``, then renamed),
    with the merge marker; returns the weight files at their final paths."""
    with atomic_dir(out) as tmp:
        files = write_hf(source, tmp, dtype=dtype, shard_bytes=shard_bytes, show_progress=show_progress,
                         hf_target=hf_target)
        marker = {"tool": "cllama-deploy merge", "base": str(Path(source.base.path).resolve()),
                  "loras": [str(Path(a.path).resolve()) for a in source.adapters], "dtype": dtype,
                  "vocab_size": source.config["vocab_size"]}
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return [out / f.name for f in files]


class _no_progress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def merge(config: MergeConfig) -> MergeResult:
    """Merge LoRA adapters into a base model and write an HF directory that AutoModelForCausalLM loads.

    The output directory appears complete or not at all (written as ``<out>.partial``, then renamed);
    an earlier merge output at ``config.out`` is replaced (anything else only with ``force``, see
    :class:`MergeConfig`).

    Raises:
        ConfigError: an option is invalid (the message names the flag).
        CheckpointError / ShapeMismatchError / TokenizerError: inputs disagree (checked before writing).
    """
    t0 = time.perf_counter()
    source = merged_source(config.base, config.loras, check_tokenizer=config.check_tokenizer,
                           check_order=config.check_adapter_order)
    dtype = resolve_dtype(source, config.dtype)
    files = write_merged_dir(source, config.out, dtype=dtype, shard_bytes=config.shard_bytes,
                             show_progress=config.show_progress, hf_target=config.hf_target)
    names = source.names()
    return MergeResult(
        out=config.out,
        shards=files,
        tensors=len(names),
        changed=sum(1 for n in names if source.changed(n)),
        vocab_size=source.config["vocab_size"],
        dtype=dtype,
        tokenizer_from=source.tokenizer_dir,
        vocab=source.vocab,
        seconds=time.perf_counter() - t0,
    )
