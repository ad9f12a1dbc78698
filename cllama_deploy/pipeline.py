"""``cllama-deploy deploy``: merge → convert → quantize in one streaming pass, with a manifest.

The LoRA adapters are merged tensor by tensor straight into the GGUF converter (no merged HF model is
written unless ``--keep-hf``). One conversion pass writes every type the converter makes itself (F32,
F16, BF16, Q8_0) plus, when llama.cpp types are requested, one intermediate GGUF (F32 if F32 is
requested, BF16 for a bf16 model or when BF16 is requested, F16 otherwise) from which llama.cpp
quantizes each type. Every output is atomic. ``manifest.json`` records the inputs with their SHA256, the
options, the versions, each step's time and peak memory, and the outputs with SHA256 and size; it is
rewritten (atomically) after every step, so a re-run with the same inputs and options skips the steps
that finished, and a killed run leaves nothing at a final path that is not complete.

A deploy is a short sequence of steps (:func:`deploy`). Each step is one function that calls
:meth:`Deployment.run` with its name, its key (a hash of everything its result depends on) and the work;
``run`` skips the work when the previous manifest holds a finished step with the same key whose files are
unchanged, and otherwise measures it and records it in the manifest. Adding a step (say, an evaluation
of each quantized file) means writing one such function and calling it from :func:`deploy`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cllama_deploy.errors import ConfigError
from cllama_deploy.files import check_replaceable_dir, sha256_file, write_text_atomic
from cllama_deploy.tokenizer.hf import DEFAULT_HF_TARGET, HF_TARGET_HELP, HF_TARGETS

MANIFEST = "manifest.json"
WORK_DIR = ".work"  # intermediate GGUF lives here until every quantization is done

# Types the converter writes itself; every other type goes through llama.cpp.
DIRECT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def normalize_quants(quants: Sequence[str]) -> list[str]:
    """Canonical, de-duplicated ``--quant`` values (F32, F16, BF16 and every llama.cpp type)."""
    from cllama_deploy.gguf.quantize import normalize_type

    out: list[str] = []
    for q in quants:
        t = normalize_type(q, "--quant")
        if t not in out:
            out.append(t)
    if not out:
        raise ConfigError("--quant: give at least one type, e.g. --quant Q4_K_M")
    return out


def default_name(base: Path, loras: Sequence[Path]) -> str:
    """The base's directory name (without a trailing ``-hf``), plus the last adapter's training stage
    (``-pt``/``-sft``, from the record ``train`` writes) or ``-lora``: e.g. ``llama-7b-sft``. The file names
    add the type: ``llama-7b-sft-Q4_K_M.gguf``."""
    from cllama_deploy.checkpoint.provenance import training_record

    stem = re.sub(r"[-_.]hf$", "", Path(base).resolve().name, flags=re.I) or "model"
    if not loras:
        return stem
    rec = training_record(loras[-1])
    return f"{stem}-{rec.stage if rec is not None else 'lora'}"


@dataclass
class DeployConfig:
    """Options of ``cllama-deploy deploy``."""

    base: Path = field(metadata={"help": "Base model: a Hugging Face LLaMA directory."})
    loras: list[Path] = field(default_factory=list, metadata={"flag": "--lora",
        "help": "PEFT LoRA adapter directories, merged in this order (the PT LoRA, then the SFT LoRA)."})
    quants: list[str] = field(default_factory=lambda: ["Q4_K_M"], metadata={"flag": "--quant",
        "help": "Output types: F32, F16, BF16, Q8_0 and every llama.cpp type (Q4_K_M, Q5_K_M, IQ4_XS, ...)."})
    out: Path = field(default=Path("deploy-out"), metadata={
        "help": "Output directory (GGUFs, Modelfiles, manifest.json)."})
    name: str | None = field(default=None, metadata={"help": "File name stem and general.name.",
        "default_text": "the base's name + the last adapter's stage, e.g. llama-7b-sft"})
    keep_hf: bool = field(default=False, metadata={"help": "Also write the merged HF model to OUT/NAME-hf."})
    shard_size: str | int = field(default="5GB", metadata={
        "help": "Largest safetensors shard of the --keep-hf model, e.g. 5GB."})
    hf_target: str = field(default=DEFAULT_HF_TARGET, metadata={"help": HF_TARGET_HELP, "choices": HF_TARGETS})
    chat_template: str = field(default="alpaca", metadata={
        "help": "alpaca, alpaca-2, none, or a Jinja file, written into every GGUF."})
    threads: int | None = field(default=None, metadata={
        "help": "llama.cpp quantization threads.", "default_text": "$CLLAMA_N_THREADS or all cores"})
    force: bool = field(default=False, metadata={
        "help": "Redo every step even if the manifest says it is done, and write into an --out that holds "
                "files deploy did not write."})
    check_adapter_order: bool = field(default=True, metadata={"flag": "--no-check-adapter-order", "invert": True,
        "help": "Deploy even if an adapter's training record, saved vocabulary or tokenizer says it was trained "
                "on another model than the one it is applied to (e.g. the adapters are in the wrong order)."})
    show_progress: bool = field(default=True, metadata={"help": "No progress bars on stderr.",
                                                        "flag": ("--quiet", "-q"), "invert": True})
    verbose: bool = field(default=False, metadata={"help": "Show llama.cpp's log.", "flag": ("--verbose", "-v")})

    def __post_init__(self) -> None:
        from cllama_deploy.gguf.convert import resolve_chat_template
        from cllama_deploy.gguf.quantize import default_threads
        from cllama_deploy.merge import parse_size

        self.base = Path(self.base)
        self.loras = [Path(p) for p in self.loras]
        self.out = Path(self.out)
        self.quants = normalize_quants(self.quants)
        if not self.base.is_dir():
            raise ConfigError(f"--base {self.base}: no such directory; pass a Hugging Face model directory")
        for lora in self.loras:
            if not lora.is_dir():
                raise ConfigError(f"--lora {lora}: no such directory; pass a PEFT adapter directory")
        # deploy writes its files into --out (and replaces NAME-hf/): a folder of someone else's is refused
        check_replaceable_dir(self.out, "--out", lambda name: True, what="deploy", marker=MANIFEST,
                              force=self.force, force_flag="--force", replaces=False)
        self.name_derived = self.name is None
        if self.name is None:
            self.name = default_name(self.base, self.loras)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"--name {self.name!r}: use a plain file name stem, e.g. chinese-alpaca-7b")
        self.shard_bytes = parse_size(self.shard_size)
        if self.hf_target not in HF_TARGETS:
            raise ConfigError(f"--hf-target {self.hf_target!r}: choose one of {', '.join(HF_TARGETS)}")
        if self.threads is None:
            self.threads = default_threads()
        if self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        resolve_chat_template(self.chat_template)


# -- the manifest --------------------------------------------------------------------------------------

@dataclass
class FileRecord:
    """A file a step wrote, relative to the output directory."""

    file: str
    size: int
    mtime_ns: int
    sha256: str | None = None  # None: scratch (not hashed), or still being hashed
    intermediate: bool | None = None  # convert's files: True for the scratch intermediate
    tensor_types: dict[str, int] | None = None

    @classmethod
    def of(cls, path: Path, out_dir: Path, **extra) -> FileRecord:
        st = path.stat()
        return cls(file=str(path.relative_to(out_dir)), size=st.st_size, mtime_ns=st.st_mtime_ns, **extra)

    def intact(self, out_dir: Path) -> bool:
        """The file is still there, with the size and mtime recorded (as make and git decide)."""
        p = out_dir / self.file
        if not p.is_file():
            return False
        st = p.stat()
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "sha256"}


@dataclass
class Step:
    """One step of a deploy as the manifest records it (and as :class:`DeployResult` reports it)."""

    name: str
    status: str = "done"  # done | skipped
    key: str | None = None  # hash of everything the result depends on
    seconds: float = 0.0
    peak_rss_bytes: int | None = None  # peak resident memory during this step only
    files: list[FileRecord] = field(default_factory=list)
    report: dict | None = None  # quantize: bits per weight, tensor types, fallbacks
    dir: str | None = None  # merged-hf: the directory written
    timings: dict[str, float] | None = None  # where the step's time went
    seconds_when_done: float | None = None  # a skipped step: its time when it ran

    @classmethod
    def from_json(cls, data: dict) -> Step:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["files"] = [FileRecord(**{k: v for k, v in f.items() if k in FileRecord.__dataclass_fields__})
                          for f in data.get("files", [])]
        return cls(**known)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "files"}
        out["files"] = [f.to_json() for f in self.files]
        return out


@dataclass
class Manifest:
    """``manifest.json``: what was done, from what, with which versions."""

    options: dict
    versions: dict
    machine: dict
    created: str = ""
    tool: str = "cllama-deploy deploy"
    complete: bool = False
    inputs: dict | None = None
    steps: list[Step] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    seconds: float | None = None
    peak_rss_bytes: int | None = None  # the whole run's peak (the steps' peaks and what came before them)

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """The manifest at ``path``, or None when missing or unreadable (then every step is redone)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            steps = [Step.from_json(s) for s in data.get("steps", [])]
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "steps"}
            return cls(steps=steps, **known)
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def save(self, path: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "steps" and (v is not None or k == "inputs")}
        data["steps"] = [s.to_json() for s in self.steps]
        write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def finished(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name and s.status in ("done", "skipped")), None)


# -- results --------------------------------------------------------------------------------------------

@dataclass
class DeployOutput:
    type: str
    path: Path
    size_bytes: int
    sha256: str
    modelfile: Path | None
    bits_per_weight: float | None = None
    fallbacks: list[str] = field(default_factory=list)


@dataclass
class DeployResult:
    out_dir: Path
    manifest: Path
    name: str
    outputs: list[DeployOutput]
    steps: list[Step]
    seconds: float


# -- measuring ----------------------------------------------------------------------------------------

class _PeakRss:
    """Peak resident set size of this process during one step.

    Linux: the kernel's high-water mark (``VmHWM``), reset at the start of the step through
    ``/proc/self/clear_refs``: exact, and no thread. Elsewhere a sampling thread (``ru_maxrss`` is the
    process-wide peak since start, so it cannot tell steps apart)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self.before = 0  # the process's peak so far, read before the reset (the reset loses it)
        self._thread: threading.Thread | None = None

    @staticmethod
    def _hwm() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def __enter__(self):
        self.before = self._hwm() or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._kernel = self._hwm() is not None
        except OSError:
            self._kernel = False
        if not self._kernel:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(self.interval):
                    with contextlib.suppress(Exception):
                        self.peak = max(self.peak, proc.memory_info().rss)

            self._proc = proc
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._kernel:
            self.peak = self._hwm() or 0
        else:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self._proc.memory_info().rss)
        return False


def release_memory() -> None:
    """Give freed heap memory back to the OS between steps (glibc keeps it otherwise, and llama.cpp's
    quantization would then run on top of what the conversion left behind)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- inputs, keys, versions ---------------------------------------------------------------------------

def _input_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _file_hashes(directory: Path, cache: dict[str, dict]) -> list[dict]:
    """Files of an input directory with size, mtime and SHA256 (reused from the previous manifest when
    size and mtime are unchanged, as make and git do)."""
    records = []
    for f in _input_files(directory):
        st = f.stat()
        old = cache.get(str(f.resolve()))
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
            digest = old["sha256"]
        else:
            digest = sha256_file(f)
        records.append({"path": str(f.resolve()), "name": f.name, "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return records


def hash_inputs(base: Path, loras: Sequence[Path], old: Manifest | None) -> dict:
    """The manifest's ``inputs``: every file of the base and adapter directories with its SHA256."""
    cache: dict[str, dict] = {}
    old_inputs = (old.inputs if old is not None else None) or {}
    for entry in [old_inputs.get("base")] + list(old_inputs.get("loras", [])):
        for rec in (entry or {}).get("files", []):
            cache[rec["path"]] = rec
    return {
        "base": {"path": str(base.resolve()), "files": _file_hashes(base, cache)},
        "loras": [{"path": str(p.resolve()), "files": _file_hashes(p, cache)} for p in loras],
    }


def inputs_digest(inputs: dict) -> str:
    h = hashlib.sha256()
    for entry in [inputs["base"]] + inputs["loras"]:
        h.update(b"\0dir")
        for rec in entry["files"]:
            h.update(f"{rec['name']}:{rec['sha256']}\n".encode())
    return h.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def versions() -> dict[str, str]:
    """Versions of everything that can change the outputs."""
    from importlib import metadata

    from cllama_deploy import __version__

    out = {"cllama_deploy": __version__, "python": platform.python_version()}
    for dist in ("gguf", "llama-cpp-python", "numpy", "safetensors", "sentencepiece"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


def ollama_modelfile(gguf_name: str, chat_template: str) -> str:
    """An Ollama Modelfile for a GGUF next to it (from the prompt-format registry in ``prompts``)."""
    from cllama_deploy.prompts import ollama_modelfile as modelfile

    return modelfile(gguf_name, chat_template)


def _intermediate_type(quants: list[str], storage: str) -> str:
    if "F32" in quants:
        return "F32"
    if "BF16" in quants or (storage == "BF16" and "F16" not in quants):
        return "BF16"
    return "F16"


# -- one run ------------------------------------------------------------------------------------------

class Deployment:
    """One run of ``deploy``: the plan (fixed before any heavy work), the manifest being written, the
    previous run's manifest, and the bookkeeping every step shares (:meth:`run`).

    Attributes:
        cfg: the options. out: the output directory. source: the lazily merged model (checked).
        llama_types: the requested types llama.cpp makes. inter_type / inter_path: the GGUF they are
            quantized from (None without llama.cpp types). final_path: {type: the GGUF to write}.
        direct: [(path, outtype)] the converter writes in its one pass.
        manifest / old: this run's manifest and the previous one (None with --force or without one).
    """

    def __init__(self, cfg: DeployConfig):
        from cllama_deploy.merge import merged_source

        self.t_start = time.perf_counter()
        self.cfg, self.out = cfg, cfg.out
        self.manifest_path = self.out / MANIFEST
        self.old = None if cfg.force else Manifest.load(self.manifest_path)
        # every invariant is checked here, from shapes and small files, before anything is written
        self.source = merged_source(cfg.base, cfg.loras, check_order=cfg.check_adapter_order)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in list(self.out.glob("*.partial")) + list((self.out / WORK_DIR).glob("*.partial")):
            stale.unlink(missing_ok=True)  # left by a killed run; never at a final path
        self.storage = self.source.base.storage_dtype()
        self.llama_types = [q for q in cfg.quants if q not in DIRECT_TYPES]
        self.inter_type = _intermediate_type(cfg.quants, self.storage) if self.llama_types else None
        self.final_path = {q: self.out / f"{cfg.name}-{q}.gguf" for q in cfg.quants}
        self.inter_path = None
        if self.inter_type is not None:
            self.inter_path = (self.final_path.get(self.inter_type)
                               or self.out / WORK_DIR / f"{cfg.name}-{self.inter_type}.gguf")
        self.direct = [(self.final_path[q], DIRECT_TYPES[q]) for q in cfg.quants if q in DIRECT_TYPES]
        if self.inter_path is not None and self.inter_type not in cfg.quants:
            self.direct.append((self.inter_path, DIRECT_TYPES[self.inter_type]))
        self.versions = versions()
        self.manifest = Manifest(
            options={"quants": cfg.quants, "name": cfg.name, "chat_template": cfg.chat_template,
                     "keep_hf": cfg.keep_hf, "shard_size": cfg.shard_bytes, "hf_target": cfg.hf_target,
                     "threads": cfg.threads,
                     "intermediate": self.inter_type},
            versions=self.versions, machine={"platform": platform.platform(), "cpus": os.cpu_count()},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        # inputs' SHA256: with nothing to reuse, hashed while converting; else now (the keys need them)
        self._inputs: dict | None = None
        self._hasher = threading.Thread(target=self._hash_inputs, daemon=True)
        if self.old is None:
            self._hasher.start()
        else:
            self._hash_inputs()
        self._pending: list[tuple[FileRecord, Future]] = []  # outputs still being hashed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.peak_rss = 0
        if not self.manifest_path.exists():
            # a first run killed before its first step still leaves a manifest (complete: false), which
            # marks the folder as deploy's; an earlier manifest is kept until the first step is recorded
            self.save()

    # -- inputs and keys ---------------------------------------------------------------------------
    def _hash_inputs(self) -> None:
        self._inputs = hash_inputs(self.cfg.base, self.cfg.loras, self.old)

    def inputs_digest(self) -> str:
        if self._inputs is None and self._hasher.is_alive():
            self._hasher.join()
        if self._inputs is None:  # the hashing thread failed: hash here to raise its error
            self._hash_inputs()
        self.manifest.inputs = self._inputs
        return inputs_digest(self._inputs)

    def key(self, kind: str, *parts: Any) -> str:
        """A step's key: a hash of its kind, the inputs' hashes, ``parts`` (the options it depends on) and
        the versions."""
        return _key(kind, self.inputs_digest(), *parts, self.versions)

    # -- the one cache check and measurement every step shares --------------------------------------
    def reusable(self, name: str, key: Callable[[], str], *, need: Callable[[FileRecord], bool] | None = None,
                 check: Callable[[Step], bool] | None = None) -> Step | None:
        """The previous run's finished step ``name`` when its key equals ``key()`` and its files (those
        ``need`` selects) are unchanged, and ``check`` (if given) accepts it; else None."""
        prev = self.old.finished(name) if self.old is not None else None
        if prev is None or prev.key != key():
            return None
        if not all(f.intact(self.out) for f in prev.files if need is None or need(f)):
            return None
        return prev if check is None or check(prev) else None

    def run(self, name: str, key: Callable[[], str], work: Callable[[Step], None], **reuse) -> Step:
        """Skip step ``name`` if :meth:`reusable`, else run ``work(step)`` (which fills in the step's
        files and report), measure it, and record it; the manifest is saved either way."""
        prev = self.reusable(name, key, **reuse)
        if prev is not None:
            step = Step.from_json(prev.to_json())
            step.status, step.seconds = "skipped", 0.0
            step.peak_rss_bytes = None
            step.seconds_when_done = prev.seconds_when_done if prev.seconds_when_done is not None else prev.seconds
            if self.cfg.show_progress:
                from cllama_deploy.progress import console

                console.print(f"[bold]{name}[/bold]: done in an earlier run with the same inputs, skipped")
        else:
            if self.cfg.show_progress:
                from cllama_deploy.progress import console

                console.print(f"[bold]{name}[/bold] …")
            step = Step(name)
            t0 = time.perf_counter()
            with _PeakRss() as peak:
                work(step)
                release_memory()
            step.seconds = round(time.perf_counter() - t0, 3)
            step.peak_rss_bytes = peak.peak
            self.peak_rss = max(self.peak_rss, peak.before, peak.peak)
            step.key = key()
        self.manifest.steps.append(step)
        self.save()
        return step

    def hash_later(self, record: FileRecord) -> None:
        """SHA256 of an output in the background (off the critical path: the next step runs meanwhile);
        :meth:`finish` waits for it."""
        self._pending.append((record, self._pool.submit(sha256_file, self.out / record.file)))

    def save(self) -> None:
        if self._inputs is not None:
            self.manifest.inputs = self._inputs
        self.manifest.save(self.manifest_path)

    def file_sha256(self, path: Path) -> str:
        rel = str(path.relative_to(self.out))
        for step in self.manifest.steps:
            for f in step.files:
                if f.file == rel and f.sha256:
                    return f.sha256
        return sha256_file(path)

    def finish(self, outputs: list[DeployOutput]) -> DeployResult:
        """Wait for the background hashes, remove the scratch folder, write the complete manifest."""
        for record, future in self._pending:
            record.sha256 = future.result()
        self._pool.shutdown()
        for step in self.manifest.steps:  # e.g. reused from a run killed before its hashes were written
            for f in step.files:
                if f.sha256 is None and not f.intermediate:
                    f.sha256 = sha256_file(self.out / f.file)
        for o in outputs:
            o.sha256 = self.file_sha256(o.path)
        work = self.out / WORK_DIR
        if work.is_dir():
            shutil.rmtree(work, ignore_errors=True)
        m = self.manifest
        m.outputs = [{"type": o.type, "file": o.path.name, "size": o.size_bytes, "sha256": o.sha256,
                      "modelfile": o.modelfile.name if o.modelfile else None, "bits_per_weight": o.bits_per_weight,
                      "fallbacks": o.fallbacks} for o in outputs]
        m.complete = True
        m.seconds = round(time.perf_counter() - self.t_start, 3)
        # the steps reset the kernel's high-water mark, so ru_maxrss would only cover the last one
        m.peak_rss_bytes = max(self.peak_rss, _PeakRss._hwm()
                               or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.save()
        return DeployResult(out_dir=self.out, manifest=self.manifest_path, name=self.cfg.name, outputs=outputs,
                            steps=list(m.steps), seconds=time.perf_counter() - self.t_start)


# -- the steps -----------------------------------------------------------------------------------------

def _convert_key(d: Deployment) -> str:
    return d.key("convert", d.cfg.name, d.cfg.chat_template,
                 sorted(str(p.relative_to(d.out)) + ":" + t for p, t in d.direct))


def _quantize_key(d: Deployment, qtype: str) -> str:
    return _key("quantize", qtype, _convert_key(d), d.versions)


def convert_step(d: Deployment) -> Step:
    """Merge + convert: every type the converter writes and the intermediate, in one pass over the merged
    tensors. The scratch intermediate is not fsynced or hashed (it is quantized, then deleted)."""
    from cllama_deploy.gguf.convert import convert_source

    # a finished conversion whose scratch intermediate is gone still serves if no quantization needs it
    pending = any(d.reusable(f"quantize {q}", lambda q=q: _quantize_key(d, q)) is None for q in d.llama_types)

    def work(step: Step) -> None:
        scratch = [p for p, _ in d.direct if p.parent.name == WORK_DIR]
        res = convert_source(d.source, d.direct, name=d.cfg.name, chat_template=d.cfg.chat_template,
                             show_progress=d.cfg.show_progress, scratch=scratch)
        for o in res.outputs:
            intermediate = o.path.parent.name == WORK_DIR
            record = FileRecord.of(o.path, d.out, intermediate=intermediate, tensor_types=o.tensor_types)
            if not intermediate:
                d.hash_later(record)  # while llama.cpp quantizes
            step.files.append(record)

    return d.run("convert", lambda: _convert_key(d), work, need=lambda f: pending or not f.intermediate)


def quantize_step(d: Deployment, qtype: str) -> Step:
    """One llama.cpp type from the intermediate; its SHA256 is computed while the next step runs."""
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize

    def work(step: Step) -> None:
        cfg = d.cfg
        res = quantize(QuantizeConfig(input=d.inter_path, output=d.final_path[qtype], type=qtype,
                                      threads=cfg.threads, verbose=cfg.verbose), show_progress=cfg.show_progress)
        record = FileRecord.of(d.final_path[qtype], d.out)
        d.hash_later(record)
        step.files = [record]
        step.report = {"bits_per_weight": round(res.bits_per_weight, 4), "tensor_types": res.type_counts(),
                       "fallbacks": [f"{t.name} ({t.type})" for t in res.fallbacks]}
        step.timings = res.timings

    return d.run(f"quantize {qtype}", lambda: _quantize_key(d, qtype), work)


def keep_hf_step(d: Deployment) -> Step:
    """``--keep-hf``: the merged model as an HF directory (the same writer as ``merge``)."""
    from cllama_deploy.merge import resolve_dtype, write_merged_dir

    hf_dir = d.out / f"{d.cfg.name}-hf"
    dtype = resolve_dtype(d.source)

    def work(step: Step) -> None:
        write_merged_dir(d.source, hf_dir, dtype=dtype, shard_bytes=d.cfg.shard_bytes,
                         show_progress=d.cfg.show_progress, hf_target=d.cfg.hf_target)
        step.dir = hf_dir.name

    return d.run("merged-hf", lambda: d.key("merged-hf", dtype, d.cfg.shard_bytes, d.cfg.hf_target), work,
                 check=lambda prev: (hf_dir / "config.json").is_file())


def modelfiles_step(d: Deployment) -> list[DeployOutput]:
    """An Ollama Modelfile next to every GGUF (rewritten only when its text changes), and the outputs."""
    outputs = []
    for q in d.cfg.quants:
        gg = d.final_path[q]
        mf = d.out / f"{gg.stem}.Modelfile"
        text = ollama_modelfile(gg.name, d.cfg.chat_template)
        if not mf.is_file() or mf.read_text(encoding="utf-8") != text:
            write_text_atomic(mf, text)
        step = d.manifest.finished(f"quantize {q}")
        info = (step.report if step is not None else None) or {}
        outputs.append(DeployOutput(type=q, path=gg, size_bytes=gg.stat().st_size, sha256="", modelfile=mf,
                                    bits_per_weight=info.get("bits_per_weight"),
                                    fallbacks=list(info.get("fallbacks", []))))
    return outputs


def deploy(config: DeployConfig) -> DeployResult:
    """Merge the adapters into the base, convert and quantize to every requested type (see module doc).

    Raises:
        ConfigError: bad options. CheckpointError / ShapeMismatchError / TokenizerError: unusable inputs
        (checked before any heavy work). InputError: llama.cpp could not quantize.
    """
    d = Deployment(config)
    if config.show_progress and config.name_derived:
        from cllama_deploy.progress import console

        console.print(f"name: [bold]{config.name}[/bold] (files {config.name}-TYPE.gguf; --name to choose another)")
    convert_step(d)
    for q in d.llama_types:
        quantize_step(d, q)
    if config.keep_hf:
        keep_hf_step(d)
    return d.finish(modelfiles_step(d))
