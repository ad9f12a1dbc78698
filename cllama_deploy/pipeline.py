"""``cllama-deploy deploy``: merge → convert → quantize in one streaming pass, with a manifest.

The LoRA adapters are merged tensor by tensor straight into the GGUF converter (no merged HF model is
written unless ``--keep-hf``). One conversion pass writes every type the converter makes itself (F32,
F16, BF16, Q8_0) plus, when llama.cpp types are requested, one intermediate GGUF (F32 if F32 is
requested, BF16 for a bf16 model or when BF16 is requested, F16 otherwise) from which llama.cpp
quantizes each type. Every output is atomic. ``manifest.json`` records the inputs with their SHA256, the
options, the versions, each step's time and peak memory, and the outputs with SHA256 and size; it is
rewritten (atomically) after every step, so a re-run with the same inputs and options skips the steps
that finished, and a killed run leaves nothing at a final path that is not complete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from cllama_deploy.errors import ConfigError
from cllama_deploy.files import sha256_file, write_text_atomic

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
        "default_text": "the last adapter's directory name, or the base's"})
    keep_hf: bool = field(default=False, metadata={"help": "Also write the merged HF model to OUT/NAME-hf."})
    chat_template: str = field(default="alpaca", metadata={
        "help": "alpaca, alpaca-2, none, or a Jinja file, written into every GGUF."})
    threads: int | None = field(default=None, metadata={
        "help": "llama.cpp quantization threads.", "default_text": "$CLLAMA_N_THREADS or all cores"})
    force: bool = field(default=False, metadata={"help": "Redo every step even if the manifest says it is done."})
    show_progress: bool = field(default=True, metadata={"help": "No progress bars on stderr.",
                                                        "flag": ("--quiet", "-q"), "invert": True})
    verbose: bool = field(default=False, metadata={"help": "Show llama.cpp's log.", "flag": ("--verbose", "-v")})

    def __post_init__(self) -> None:
        from cllama_deploy.gguf.convert import resolve_chat_template
        from cllama_deploy.gguf.quantize import default_threads

        self.base = Path(self.base)
        self.loras = [Path(p) for p in self.loras]
        self.out = Path(self.out)
        self.quants = normalize_quants(self.quants)
        if not self.base.is_dir():
            raise ConfigError(f"--base {self.base}: no such directory; pass a Hugging Face model directory")
        for lora in self.loras:
            if not lora.is_dir():
                raise ConfigError(f"--lora {lora}: no such directory; pass a PEFT adapter directory")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; pass a directory")
        if self.name is None:
            self.name = (self.loras[-1] if self.loras else self.base).resolve().name
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"--name {self.name!r}: use a plain file name stem, e.g. chinese-alpaca-7b")
        if self.threads is None:
            self.threads = default_threads()
        if self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        resolve_chat_template(self.chat_template)


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
class StepRecord:
    name: str
    status: str  # done | skipped
    seconds: float
    peak_rss_bytes: int | None


@dataclass
class DeployResult:
    out_dir: Path
    manifest: Path
    outputs: list[DeployOutput]
    steps: list[StepRecord]
    seconds: float


# -- measuring ----------------------------------------------------------------------------------------

class _RssSampler:
    """Peak resident set size of this process during one step (a sampling thread; ru_maxrss is the
    process-wide peak since start, so it cannot tell steps apart)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
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


# -- input hashing ------------------------------------------------------------------------------------

def _input_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _file_records(directory: Path, cache: dict[str, dict]) -> list[dict]:
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


def _hash_inputs(cfg: DeployConfig, old: dict | None) -> dict:
    cache: dict[str, dict] = {}
    for entry in ([(old or {}).get("inputs", {}).get("base")] + list((old or {}).get("inputs", {}).get("loras", []))):
        for rec in (entry or {}).get("files", []):
            cache[rec["path"]] = rec
    return {
        "base": {"path": str(cfg.base.resolve()), "files": _file_records(cfg.base, cache)},
        "loras": [{"path": str(p.resolve()), "files": _file_records(p, cache)} for p in cfg.loras],
    }


def _inputs_digest(inputs: dict) -> str:
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


# -- Ollama -------------------------------------------------------------------------------------------

def ollama_modelfile(gguf_name: str, chat_template: str) -> str:
    """An Ollama Modelfile for a GGUF next to it (from the prompt-format registry in ``prompts``)."""
    from cllama_deploy.prompts import ollama_modelfile as modelfile

    return modelfile(gguf_name, chat_template)


# -- the pipeline --------------------------------------------------------------------------------------

def _intermediate_type(quants: list[str], storage: str) -> str:
    if "F32" in quants:
        return "F32"
    if "BF16" in quants or (storage == "BF16" and "F16" not in quants):
        return "BF16"
    return "F16"


def _load_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: redo everything


def _file_ok(rec: dict, out_dir: Path) -> bool:
    p = out_dir / rec["file"]
    if not p.is_file():
        return False
    st = p.stat()
    return st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns")


def _record_file(path: Path, out_dir: Path, sha: str | None = None, hash_it: bool = True) -> dict:
    st = path.stat()
    return {"file": str(path.relative_to(out_dir)), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha or (sha256_file(path) if hash_it else None)}


def deploy(config: DeployConfig) -> DeployResult:
    """Merge the adapters into the base, convert and quantize to every requested type (see module doc).

    Raises:
        ConfigError: bad options. CheckpointError / ShapeMismatchError / TokenizerError: unusable inputs
        (checked before any heavy work). InputError: llama.cpp could not quantize.
    """
    from cllama_deploy.gguf.convert import convert_source
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize
    from cllama_deploy.merge import merged_source
    from cllama_deploy.progress import console

    t_start = time.perf_counter()
    cfg = config
    out = cfg.out
    manifest_path = out / MANIFEST
    old = None if cfg.force else _load_manifest(manifest_path)
    old_steps = {s["name"]: s for s in (old or {}).get("steps", []) if s.get("status") in ("done", "skipped")}

    # 1. plan and check everything that can be checked from shapes and small files
    source = merged_source(cfg.base, cfg.loras)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.partial")) + list((out / WORK_DIR).glob("*.partial")):
        stale.unlink(missing_ok=True)  # left by a killed run; never at a final path
    storage = source.base.storage_dtype() if hasattr(source, "base") else "F16"
    llama_types = [q for q in cfg.quants if q not in DIRECT_TYPES]
    inter_type = _intermediate_type(cfg.quants, storage) if llama_types else None
    final_path = {q: out / f"{cfg.name}-{q}.gguf" for q in cfg.quants}
    inter_path = None
    if inter_type is not None:
        inter_path = final_path.get(inter_type) or out / WORK_DIR / f"{cfg.name}-{inter_type}.gguf"

    # 2. inputs' hashes (reused from the previous manifest when size and mtime are unchanged)
    hashed: dict = {}

    def do_hash() -> None:
        hashed["inputs"] = _hash_inputs(cfg, old)

    hasher = threading.Thread(target=do_hash, daemon=True)
    if old is None:
        hasher.start()  # nothing can be skipped: hash while converting
    else:
        do_hash()
    options = {"quants": cfg.quants, "name": cfg.name, "chat_template": cfg.chat_template,
               "keep_hf": cfg.keep_hf, "threads": cfg.threads, "intermediate": inter_type}
    vers = versions()
    manifest: dict[str, Any] = {
        "tool": "cllama-deploy deploy", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "inputs": None, "options": options, "versions": vers,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "steps": [], "outputs": [],
    }
    steps: list[StepRecord] = []

    def inputs_digest() -> str:
        if "inputs" not in hashed:
            hasher.join()
        if "inputs" not in hashed:  # the hashing thread failed: hash here to raise its error
            do_hash()
        return _inputs_digest(hashed["inputs"])

    def write_manifest() -> None:
        if "inputs" in hashed:
            manifest["inputs"] = hashed["inputs"]
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    def reusable(name: str, key: str | None, need_intermediate: bool = True) -> dict | None:
        s = old_steps.get(name)
        if key is None or s is None or s.get("key") != key:
            return None
        files = [f for f in s.get("files", []) if need_intermediate or not f.get("intermediate")]
        return s if all(_file_ok(f, out) for f in files) else None

    @contextlib.contextmanager
    def step(name: str) -> Iterator[dict]:
        rec: dict[str, Any] = {"name": name, "status": "done", "files": []}
        if cfg.show_progress:
            console.print(f"[bold]{name}[/bold] …")
        t0 = time.perf_counter()
        with _RssSampler() as sampler:
            yield rec
            release_memory()
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["peak_rss_bytes"] = sampler.peak
        manifest["steps"].append(rec)
        steps.append(StepRecord(name, "done", rec["seconds"], sampler.peak))
        write_manifest()

    def skip(prev: dict) -> None:
        rec = dict(prev)
        rec["status"] = "skipped"
        rec["seconds_when_done"] = prev.get("seconds_when_done", prev.get("seconds"))
        rec["seconds"] = 0.0
        manifest["steps"].append(rec)
        steps.append(StepRecord(prev["name"], "skipped", 0.0, None))
        write_manifest()
        if cfg.show_progress:
            console.print(f"[bold]{prev['name']}[/bold]: done in an earlier run with the same inputs, skipped")

    # 3. keys: every step's key derives from the inputs' hashes, the options and the versions, so a
    # re-run skips exactly the steps whose results would be the same
    direct = [(final_path[q], DIRECT_TYPES[q]) for q in cfg.quants if q in DIRECT_TYPES]
    if inter_path is not None and inter_type not in cfg.quants:
        direct.append((inter_path, DIRECT_TYPES[inter_type]))

    def convert_key_for(digest: str) -> str:
        return _key("convert", digest, cfg.name, cfg.chat_template,
                    sorted(str(pth.relative_to(out)) + ":" + t for pth, t in direct), vers)

    def quant_key(q: str, ckey: str) -> str:
        return _key("quantize", q, ckey, vers)

    in_digest = inputs_digest() if old is not None else None
    convert_key = convert_key_for(in_digest) if in_digest is not None else None
    pending = [q for q in llama_types
               if convert_key is None or reusable(f"quantize {q}", quant_key(q, convert_key)) is None]

    # 4. convert: the direct types + the intermediate, in one pass over the merged tensors
    prev = reusable("convert", convert_key, need_intermediate=bool(pending))
    if prev is not None:
        skip(prev)
    else:
        with step("convert") as rec:
            # the intermediate is scratch (quantized, then deleted): no fsync, no SHA256
            scratch = [p for p, _ in direct if p.parent.name == WORK_DIR]
            res = convert_source(source, direct, name=cfg.name, chat_template=cfg.chat_template,
                                 show_progress=cfg.show_progress, scratch=scratch)
            in_digest = inputs_digest()
            convert_key = convert_key_for(in_digest)
            rec["key"] = convert_key
            for o in res.outputs:
                intermediate = o.path.parent.name == WORK_DIR
                frec = _record_file(o.path, out, hash_it=not intermediate)
                frec["intermediate"] = intermediate
                frec["tensor_types"] = o.tensor_types
                rec["files"].append(frec)

    # 5. quantize each llama.cpp type from the intermediate
    quant_info: dict[str, dict] = {}
    for q in llama_types:
        key = quant_key(q, convert_key)
        prev = None if q in pending else reusable(f"quantize {q}", key)
        if prev is not None:
            skip(prev)
            quant_info[q] = prev.get("report", {})
            continue
        with step(f"quantize {q}") as rec:
            res = quantize(QuantizeConfig(input=inter_path, output=final_path[q], type=q, threads=cfg.threads,
                                          verbose=cfg.verbose), show_progress=cfg.show_progress)
            rec["key"] = key
            rec["files"] = [_record_file(final_path[q], out)]
            rec["report"] = {"bits_per_weight": round(res.bits_per_weight, 4),
                             "tensor_types": res.type_counts(),
                             "fallbacks": [f"{t.name} ({t.type})" for t in res.fallbacks]}
            quant_info[q] = rec["report"]

    # 6. optional merged HF model
    if cfg.keep_hf:
        from cllama_deploy.files import atomic_dir
        from cllama_deploy.merge import write_hf

        hf_dir = out / f"{cfg.name}-hf"
        key = _key("merged-hf", in_digest, vers)
        prev = old_steps.get("merged-hf")
        if prev is not None and prev.get("key") == key and (hf_dir / "config.json").is_file():
            skip(prev)
        else:
            with step("merged-hf") as rec:
                dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(storage, "float16")
                with atomic_dir(hf_dir) as tmp:
                    write_hf(source, tmp, dtype=dtype, shard_bytes=5 * 10**9, show_progress=cfg.show_progress)
                rec["key"] = key
                rec["dir"] = hf_dir.name

    # 7. Modelfiles, the outputs list, cleanup
    outputs: list[DeployOutput] = []
    file_sha = {f["file"]: f["sha256"] for s in manifest["steps"] for f in s.get("files", [])}
    for q in cfg.quants:
        gg = final_path[q]
        mf = out / f"{gg.stem}.Modelfile"
        write_text_atomic(mf, ollama_modelfile(gg.name, cfg.chat_template))
        rel = str(gg.relative_to(out))
        info = quant_info.get(q, {})
        outputs.append(DeployOutput(type=q, path=gg, size_bytes=gg.stat().st_size,
                                    sha256=file_sha.get(rel) or sha256_file(gg), modelfile=mf,
                                    bits_per_weight=info.get("bits_per_weight"),
                                    fallbacks=list(info.get("fallbacks", []))))
    work = out / WORK_DIR
    if work.is_dir():
        shutil.rmtree(work, ignore_errors=True)
    manifest["outputs"] = [
        {"type": o.type, "file": o.path.name, "size": o.size_bytes, "sha256": o.sha256,
         "modelfile": o.modelfile.name if o.modelfile else None, "bits_per_weight": o.bits_per_weight,
         "fallbacks": o.fallbacks}
        for o in outputs
    ]
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - t_start, 3)
    manifest["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_manifest()
    return DeployResult(out_dir=out, manifest=manifest_path, outputs=outputs, steps=steps,
                        seconds=time.perf_counter() - t_start)
