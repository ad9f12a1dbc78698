"""Quantize a GGUF with llama.cpp (``llama_cpp.llama_model_quantize``), atomically, with a report.

llama.cpp chooses the type of every tensor itself (the ``_M``/``_S``/``_L`` mixtures give some tensors
more bits); a tensor whose rows are not a multiple of the type's block size (256 values for k-quants and
most IQ types) falls back to a 32-block type (Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL) or F16. We read the written
file back with ``gguf.GGUFReader`` and report, for every tensor, its type against the file type's base
type: ``quantized`` (the base type), ``mixture`` (llama.cpp's choice for that tensor), ``fallback``
(incompatible row size) or ``kept`` (1-D tensors and norms stay F32).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.errors import CllamaError, ConfigError, DependencyError, InputError, require
from cllama_deploy.files import atomic_path

# llama.cpp's quantization types (tools/quantize/quantize.cpp QUANT_OPTIONS):
# name → (llama_ftype constant in llama_cpp, base GGML type of the quantized tensors, description).
# The ftype is looked up by name in llama_cpp so that the numbers always match the compiled library.
QUANT_TYPES: dict[str, tuple[str, str, str]] = {
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", "4.5 bpw, legacy round-to-nearest"),
    "Q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1", "5.0 bpw, legacy, with offsets"),
    "Q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0", "5.5 bpw, legacy"),
    "Q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1", "6.0 bpw, legacy, with offsets"),
    "Q1_0": ("LLAMA_FTYPE_MOSTLY_Q1_0", "Q1_0", "1.125 bpw"),
    "Q2_0": ("LLAMA_FTYPE_MOSTLY_Q2_0", "Q2_0", "2.25 bpw (group 64)"),
    "MXFP4_MOE": ("LLAMA_FTYPE_MOSTLY_MXFP4_MOE", "MXFP4", "MXFP4 (meant for MoE experts)"),
    "IQ2_XXS": ("LLAMA_FTYPE_MOSTLY_IQ2_XXS", "IQ2_XXS", "2.06 bpw (needs an importance matrix)"),
    "IQ2_XS": ("LLAMA_FTYPE_MOSTLY_IQ2_XS", "IQ2_XS", "2.31 bpw (needs an importance matrix)"),
    "IQ2_S": ("LLAMA_FTYPE_MOSTLY_IQ2_S", "IQ2_XS", "2.5 bpw (needs an importance matrix)"),
    "IQ2_M": ("LLAMA_FTYPE_MOSTLY_IQ2_M", "IQ2_S", "2.7 bpw (needs an importance matrix)"),
    "IQ1_S": ("LLAMA_FTYPE_MOSTLY_IQ1_S", "IQ1_S", "1.56 bpw (needs an importance matrix)"),
    "IQ1_M": ("LLAMA_FTYPE_MOSTLY_IQ1_M", "IQ1_M", "1.75 bpw (needs an importance matrix)"),
    "TQ1_0": ("LLAMA_FTYPE_MOSTLY_TQ1_0", "TQ1_0", "1.69 bpw ternary (for ternary-trained models)"),
    "TQ2_0": ("LLAMA_FTYPE_MOSTLY_TQ2_0", "TQ2_0", "2.06 bpw ternary (for ternary-trained models)"),
    "Q2_K": ("LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", "k-quant mix, ~2.96G for an 8B model"),
    "Q2_K_S": ("LLAMA_FTYPE_MOSTLY_Q2_K_S", "Q2_K", "k-quant, small (needs an importance matrix)"),
    "IQ3_XXS": ("LLAMA_FTYPE_MOSTLY_IQ3_XXS", "IQ3_XXS", "3.06 bpw (needs an importance matrix)"),
    "IQ3_XS": ("LLAMA_FTYPE_MOSTLY_IQ3_XS", "IQ3_S", "3.3 bpw (needs an importance matrix)"),
    "IQ3_S": ("LLAMA_FTYPE_MOSTLY_IQ3_S", "IQ3_S", "3.44 bpw"),
    "IQ3_M": ("LLAMA_FTYPE_MOSTLY_IQ3_M", "IQ3_S", "3.66 bpw mix"),
    "Q3_K_S": ("LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K", "k-quant, small"),
    "Q3_K_M": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", "k-quant mix, medium"),
    "Q3_K_L": ("LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K", "k-quant mix, large"),
    "IQ4_NL": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL", "4.50 bpw non-linear"),
    "IQ4_XS": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS", "4.25 bpw non-linear"),
    "Q4_K_S": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K", "k-quant, small"),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", "k-quant mix, medium (the usual choice)"),
    "Q5_K_S": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K", "k-quant, small"),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", "k-quant mix, medium"),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", "k-quant, 6.56 bpw"),
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", "8.5 bpw, nearly lossless"),
    "F16": ("LLAMA_FTYPE_MOSTLY_F16", "F16", "16-bit float"),
    "BF16": ("LLAMA_FTYPE_MOSTLY_BF16", "BF16", "16-bit brain float"),
    "F32": ("LLAMA_FTYPE_ALL_F32", "F32", "32-bit float"),
}

# llama.cpp's short aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Types llama.cpp refuses to produce without an importance matrix (llama-quant.cpp
# tensor_requires_imatrix: IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS tensors, and Q2_K inside Q2_K_S;
# IQ2_M and IQ3_XS files contain such tensors). Checked by tests/gguf/test_quantize.py, which
# quantizes to every other type. cllama-deploy does not compute importance matrices.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS",
                           "Q2_K_S"})


def normalize_type(name: str, flag: str = "--type") -> str:
    """Canonical quantization type name (case-insensitive, aliases resolved).

    Raises:
        ConfigError: unknown type, or one that needs an importance matrix.
    """
    t = str(name).strip().upper()
    t = ALIASES.get(t, t)
    if t not in QUANT_TYPES:
        raise ConfigError(f"{flag} {name!r} is not a llama.cpp quantization type; choose one of "
                          f"{', '.join(available_types())}")
    if not _gguf_reads(t):
        raise ConfigError(
            f"{flag} {t}: the installed gguf package cannot read {QUANT_TYPES[t][1]} tensors, so the result could "
            "not be checked or inspected; upgrade it (pip install -U gguf) or choose another type"
        )
    if t in NEEDS_IMATRIX:
        raise ConfigError(
            f"{flag} {t} needs an importance matrix (llama.cpp refuses to make it without one) and "
            "cllama-deploy does not compute one; choose an equally small type that needs none, "
            "e.g. Q2_K, IQ3_S or Q3_K_S"
        )
    return t


def _gguf_reads(qtype: str) -> bool:
    # llama.cpp may know newer tensor types than the gguf package we read GGUFs with (Q2_0 in 2026)
    import gguf

    return QUANT_TYPES[qtype][1] in gguf.GGMLQuantizationType.__members__


def available_types() -> list[str]:
    """Every type ``quantize`` accepts: not needing an importance matrix, readable by the gguf package."""
    return [t for t in QUANT_TYPES if t not in NEEDS_IMATRIX and _gguf_reads(t)]


def ftype_of(qtype: str) -> int:
    """The llama_ftype number of a type (``cllama_deploy.gguf.keys.file_type``)."""
    from cllama_deploy.gguf.keys import file_type

    try:
        return file_type(qtype)
    except KeyError:
        raise DependencyError(f"the installed llama-cpp-python has no {QUANT_TYPES[qtype][0]}; upgrade it "
                              "(pip install -U llama-cpp-python) or choose another type") from None


def ggml_type_of(name: str, flag: str) -> int:
    """GGML tensor type number for --output-tensor-type / --token-embedding-type (e.g. q8_0, f16)."""
    llama_cpp = require("llama_cpp", "all")
    value = getattr(llama_cpp, f"GGML_TYPE_{str(name).strip().upper()}", None)
    if value is None or str(name).strip().upper() in ("COUNT", "I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"):
        raise ConfigError(f"{flag} {name!r} is not a GGML tensor type llama.cpp can quantize to; "
                          "use e.g. q8_0, q6_k, q4_k, f16 or f32")
    return int(value)


def default_threads() -> int:
    """Quantization threads: ``CLLAMA_N_THREADS``, else every usable core (``engine.threads``)."""
    from cllama_deploy.engine.threads import default_n_threads

    return default_n_threads("quantize")


@dataclass
class QuantizeConfig:
    """Options of ``cllama-deploy quantize``."""

    input: Path = field(metadata={"help": "GGUF to quantize (f32, f16 or bf16).", "argument": True, "metavar": "IN"})
    output: Path = field(metadata={"help": "GGUF to write (atomically).", "argument": True, "metavar": "OUT"})
    type: str = field(default="Q4_K_M", metadata={"flag": ("--type", "-t"),
        "help": "llama.cpp type, e.g. Q4_K_M, Q5_K_M, Q8_0, IQ4_XS (case-insensitive; `--list-types` shows all)."})
    threads: int | None = field(default=None, metadata={
        "help": "Quantization threads.", "default_text": "$CLLAMA_N_THREADS or all cores"})
    output_tensor_type: str | None = field(default=None, metadata={
        "help": "GGML type for output.weight (e.g. q8_0).", "default_text": "llama.cpp's choice"})
    token_embedding_type: str | None = field(default=None, metadata={
        "help": "GGML type for token_embd.weight (e.g. q8_0).", "default_text": "llama.cpp's choice"})
    pure: bool = field(default=False, metadata={"help": "Every tensor gets the base type (no k-quant mixture)."})
    allow_requantize: bool = field(default=False, metadata={
        "help": "Accept an already-quantized input (quality suffers)."})
    verbose: bool = field(default=False, metadata={"help": "Show llama.cpp's log on stderr.", "flag": ("--verbose", "-v")})

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        self.type = normalize_type(self.type)
        if self.threads is None:
            self.threads = default_threads()
        if not isinstance(self.threads, int) or self.threads <= 0:
            raise ConfigError(f"--threads must be a positive integer, got {self.threads!r}")
        check_gguf_file(self.input, "IN")
        if self.output.is_dir():
            raise ConfigError(f"OUT {self.output} is a directory; give the path of the .gguf file to write")
        if self.output.resolve() == self.input.resolve():
            raise ConfigError("OUT must differ from IN; quantize writes a new file")
        if self.output_tensor_type is not None:
            ggml_type_of(self.output_tensor_type, "--output-tensor-type")
        if self.token_embedding_type is not None:
            ggml_type_of(self.token_embedding_type, "--token-embedding-type")


from cllama_deploy.gguf.reader import check_gguf_file  # noqa: E402  (kept importable from here)


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]  # GGML order (row length first), as llama.cpp prints it
    type: str
    status: str  # quantized | mixture | fallback | kept
    n_bytes: int


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote and how the tensors turned out."""

    path: Path
    type: str
    base_type: str
    size_bytes: int
    input_size_bytes: int
    n_params: int
    bits_per_weight: float
    tensors: list[TensorReport]
    seconds: float
    log: str = field(default="", repr=False)
    # where the time went: llama_model_quantize itself, the fsync + rename, reading the report back
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.status == "fallback"]

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return counts


def tensor_report(path: Path, base_type: str) -> tuple[list[TensorReport], int, int]:
    """Per-tensor types of a GGUF against the base type; also (elements, data bytes)."""
    import gguf

    from cllama_deploy.gguf.reader import scan_gguf, weight_totals

    reader = scan_gguf(path, "OUT")  # the tensor table only: GGUFReader takes seconds on a large vocabulary
    block_of = {q.name: gguf.GGML_QUANT_SIZES[q][0] for q in gguf.GGML_QUANT_SIZES}
    base_block = block_of.get(base_type, 1)
    out: list[TensorReport] = []
    for t in reader.tensors:
        tname = t.tensor_type.name
        shape = tuple(int(x) for x in t.shape)  # GGML order: ne0 (row length) first
        if tname == base_type:
            status = "quantized"
        elif len(shape) <= 1:
            status = "kept"
        elif shape[0] % base_block:
            status = "fallback"
        else:
            status = "mixture"
        out.append(TensorReport(t.name, shape, tname, status, int(t.n_bytes)))
    totals = weight_totals(reader)
    return out, totals.n_params, totals.n_bytes


class _LlamaLog:
    """Route llama.cpp's log through our callback while quantizing: kept in memory (shown on errors and
    with --verbose) and used for progress; the llama-cpp-python callback is restored afterwards."""

    _progress = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")

    def __init__(self, verbose: bool, on_tensor=None):
        self.verbose = verbose
        self.on_tensor = on_tensor
        self.chunks: list[bytes] = []

    def __enter__(self):
        import llama_cpp

        def callback(level, text, user_data):  # runs on the quantizing thread, with the GIL
            if text:
                self.chunks.append(text)
                if self.verbose:
                    sys.stderr.write(text.decode("utf-8", "replace"))
                    sys.stderr.flush()
                if self.on_tensor is not None and (m := self._progress.search(text)):
                    self.on_tensor(int(m.group(1)), int(m.group(2)))

        self._cb = llama_cpp.llama_log_callback(callback)
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        import llama_cpp

        try:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except Exception:  # noqa: BLE001 - best effort: fall back to no callback
            llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), ctypes.c_void_p(0))
        return False

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def _input_file_type(path: Path) -> str | None:
    """The input's general.file_type as a type name (None when absent)."""
    from cllama_deploy.gguf.reader import file_type_of, scan_gguf

    return file_type_of(scan_gguf(path, "IN"))


def _error_from_log(log: str, cfg: QuantizeConfig) -> CllamaError:
    if "requires an imatrix" in log or "importance matrix" in log:
        return ConfigError(f"--type {cfg.type} needs an importance matrix for this model, which cllama-deploy "
                           "does not compute; choose another type (e.g. Q2_K, IQ3_S, Q3_K_S, Q4_K_M)")
    if "requantizing from type" in log:
        return InputError(f"IN {cfg.input} is already quantized; quantize from the f16/f32 GGUF, "
                          "or pass --allow-requantize (loses quality)")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()] or lines[-3:]
    return InputError(f"llama.cpp could not quantize {cfg.input} to {cfg.type}: {' | '.join(errs[-3:])}")


def quantize(config: QuantizeConfig, *, show_progress: bool = True) -> QuantizeResult:
    """Quantize ``config.input`` to ``config.output`` with llama.cpp (``cllama-deploy quantize``).

    Raises:
        ConfigError / InputError: bad options or input; the type needs an importance matrix.
        DependencyError: llama-cpp-python is not installed.
    """
    llama_cpp = require("llama_cpp", "all")
    t0 = time.perf_counter()
    qtype = config.type
    in_type = _input_file_type(config.input)
    if in_type not in (None, "F32", "F16", "BF16") and not config.allow_requantize:
        raise InputError(f"IN {config.input} is already quantized ({in_type}); quantize from the f16/f32 GGUF, "
                         "or pass --allow-requantize (loses quality)")

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(config.threads)
    params.ftype = ftype_of(qtype)
    params.allow_requantize = bool(config.allow_requantize)
    params.pure = bool(config.pure)
    if config.output_tensor_type is not None:
        params.output_tensor_type = ggml_type_of(config.output_tensor_type, "--output-tensor-type")
    if config.token_embedding_type is not None:
        params.token_embedding_type = ggml_type_of(config.token_embedding_type, "--token-embedding-type")

    with contextlib.ExitStack() as stack:
        bar = task = None
        if show_progress and not config.verbose:
            from cllama_deploy.progress import progress

            bar = stack.enter_context(progress(transient=True))
            task = bar.add_task(f"quantize {qtype}", total=None)

        def on_tensor(i: int, n: int) -> None:
            if bar is not None:
                bar.update(task, completed=i, total=n)

        tmp = stack.enter_context(atomic_path(config.output))
        log = stack.enter_context(_LlamaLog(config.verbose, on_tensor))
        t_call = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(config.input).encode(), str(tmp).encode(), ctypes.byref(params))
        t_called = time.perf_counter()
        if rc != 0:
            raise _error_from_log(log.text, config)
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise _error_from_log(log.text, config)
    t_written = time.perf_counter()
    base = QUANT_TYPES[qtype][1]
    tensors, n_el, n_bytes = tensor_report(config.output, base)
    t_end = time.perf_counter()
    return QuantizeResult(
        path=config.output, type=qtype, base_type=base, size_bytes=config.output.stat().st_size,
        input_size_bytes=config.input.stat().st_size, n_params=n_el,
        bits_per_weight=(8.0 * n_bytes / n_el) if n_el else 0.0, tensors=tensors,
        seconds=t_end - t0, log=log.text,
        timings={"before": round(t_call - t0, 3), "llama_model_quantize": round(t_called - t_call, 3),
                 "fsync_rename": round(t_written - t_called, 3), "report": round(t_end - t_written, 3)},
    )
