"""``cllama-deploy eval quant``: which quantization to ship, measured on your text.

Quantizes an F16 (or F32/BF16) GGUF to every requested type with llama.cpp (files already there are
reused when their type matches), then scores the reference and every quantized file on the same
llama.cpp perplexity windows (``evaluation.perplexity``) and reports, per type: file size, bits per
weight, perplexity and its ratio to the reference, KL divergence from the reference per token (mean with
llama.cpp's uncertainty, and percentiles), "same top p" (the argmax agrees with the reference), RMS Δp,
prompt tokens/s (the windows) and generation tokens/s (llama-bench's tg).

The reference is the input GGUF itself (llama.cpp's ``--kl-divergence-base`` workflow) or, with
``--reference``, an HF model directory with ``--lora`` adapters (transformers) or another GGUF. Its logits
are computed in this process window by window, right before the quantized models score the same window,
so nothing is written to disk: memory holds one window of logits per model (ctx/2 × n_vocab floats).
All models are open at once (llama.cpp memory-maps the files).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.errors import ConfigError, ShapeMismatchError
from cllama_deploy.evaluation.models import LlamaCppScorer, ModelOptions, model_kind, open_scorer
from cllama_deploy.evaluation.perplexity import check_window, first_scored, read_text, tokens_digest, windows
from cllama_deploy.evaluation.stats import KLStats
from cllama_deploy.files import write_text_atomic
from cllama_deploy.options import option

DEFAULT_TYPES = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


@dataclass(kw_only=True)
class QuantEvalConfig(ModelOptions):
    """Options of ``cllama-deploy eval quant`` (--lora / --tokenizer / --hf-dtype apply to an HF --reference)."""

    input: Path = option(help="The GGUF to quantize (F16, F32 or BF16).", argument=True, metavar="F16.gguf")
    types: list[str] = option(list(DEFAULT_TYPES), "Quantization types, comma-separated or repeated "
                              "(F32, F16, Q8_0, Q4_K_M, ...).", flag="--types")
    text: Path = option(help="UTF-8 text file every model is scored on.")
    reference: Path | None = option(None, "Reference model: an HF directory (with --lora) or another GGUF.",
                                    default_text="the input GGUF")
    ctx: int = option(512, "Window length in tokens (llama-perplexity's -c).")
    chunks: int | None = option(None, "Score at most this many windows.", default_text="all that fit")
    out_dir: Path | None = option(None, "Directory of the quantized files (existing ones of the right type are "
                                  "reused).", default_text="the input's directory")
    gen_tokens: int = option(128, "Tokens of the generation-speed test of each type (llama-bench tg); 0 skips it.")
    speed_reps: int = option(3, "Repetitions of the generation-speed test.")
    quant_threads: int | None = option(None, "Threads used to quantize.", default_text="$CLLAMA_N_THREADS or all cores")
    markdown: Path | None = option(None, "Write the report as a Markdown table to this file.", flag="--markdown",
                                   default_text="no Markdown")
    plot: Path | None = option(None, "Write a PNG plot of size vs KL divergence per type (needs matplotlib).",
                               default_text="no plot")
    json_path: Path | None = option(None, "Write the report as JSON to this file.", flag="--json",
                                    default_text="no JSON")
    show_progress: bool = option(True, "No progress bars on stderr.", flag=("--quiet", "-q"), invert=True)

    def __post_init__(self) -> None:
        from cllama_deploy.gguf.quantize import check_gguf_file, normalize_type

        self.input = Path(self.input)
        check_gguf_file(self.input, "F16.gguf")
        self._check_model_options()
        self.text = Path(self.text)
        if not self.text.is_file():
            raise ConfigError(f"--text {self.text}: no such file")
        names = [t.strip() for v in (self.types or []) for t in str(v).split(",") if t.strip()]
        if not names:
            raise ConfigError("--types is empty; give e.g. --types Q4_K_M,Q8_0")
        self.types = list(dict.fromkeys(normalize_type(t, "--types") for t in names))
        if self.reference is not None:
            self.reference = Path(self.reference)
            model_kind(self.reference, "--reference")
        if (self.lora or self.tokenizer) and (self.reference is None or model_kind(self.reference) != "hf"):
            raise ConfigError("--lora and --tokenizer apply to an HF --reference directory; "
                              "give --reference HF_DIR or drop them")
        check_window(self.ctx, self.chunks)
        self.out_dir = Path(self.out_dir) if self.out_dir is not None else self.input.parent
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out-dir {self.out_dir} is a file; give a directory")
        for flag, value in (("--gen-tokens", self.gen_tokens), ("--speed-reps", self.speed_reps)):
            if value < 0:
                raise ConfigError(f"{flag} must be >= 0, got {value}")
        if self.quant_threads is not None and self.quant_threads < 1:
            raise ConfigError(f"--quant-threads must be >= 1, got {self.quant_threads}")
        for flag, path in (("--markdown", self.markdown), ("--plot", self.plot), ("--json", self.json_path)):
            if path is not None and Path(path).is_dir():
                raise ConfigError(f"{flag} {path} is a directory; give a file name")
        if self.plot is not None:
            from cllama_deploy.errors import require

            require("matplotlib", "eval")


def file_stem(path: Path) -> str:
    """``model-F16.gguf`` → ``model`` (the type suffix ``deploy`` and llama.cpp put there is dropped)."""
    from cllama_deploy.gguf.quantize import QUANT_TYPES

    stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.stem
    m = re.match(r"^(.*?)[-_.]([A-Za-z0-9_]+)$", stem)
    if m and m.group(2).upper() in QUANT_TYPES and m.group(1):
        return m.group(1)
    return stem


@dataclass
class QuantFile:
    type: str
    path: Path
    size_bytes: int
    bits_per_weight: float
    reused: bool
    seconds: float = 0.0
    matrices: int = 0  # 2-D tensors
    fallback: dict[str, int] = field(default_factory=dict)  # type llama.cpp fell back to → matrices

    def fallback_note(self) -> str | None:
        """Why a type's figures may equal another's: most of its matrices are of a fallback type."""
        if not self.fallback:
            return None
        n = sum(self.fallback.values())
        got = ", ".join(f"{c} to {t}" for t, c in sorted(self.fallback.items(), key=lambda x: -x[1]))
        return (f"{self.type}: {n} of {self.matrices} weight matrices fell back ({got}): their rows are not a "
                f"multiple of {self.type}'s block size, so this row measures those types there")


def _file_info(qtype: str, path: Path, reused: bool, seconds: float = 0.0) -> QuantFile:
    from cllama_deploy.gguf.quantize import QUANT_TYPES, tensor_report

    tensors, n_el, n_bytes = tensor_report(path, QUANT_TYPES[qtype][1])
    fallback: dict[str, int] = {}
    for t in tensors:
        if t.status == "fallback":
            fallback[t.type] = fallback.get(t.type, 0) + 1
    return QuantFile(qtype, path, path.stat().st_size, 8.0 * n_bytes / n_el if n_el else 0.0, reused, seconds,
                     matrices=sum(len(t.shape) >= 2 for t in tensors), fallback=fallback)


def prepare_files(config: QuantEvalConfig) -> list[QuantFile]:
    """Every requested type as a file: reused when one of that type exists, else quantized now."""
    from cllama_deploy.gguf.quantize import QuantizeConfig, _input_file_type, quantize

    out: list[QuantFile] = []
    stem = file_stem(config.input)
    in_type = _input_file_type(config.input)
    for qtype in config.types:
        path = config.out_dir / f"{stem}-{qtype}.gguf"
        if in_type == qtype and (not path.exists() or path.resolve() == config.input.resolve()):
            out.append(_file_info(qtype, config.input, reused=True))
            continue
        if path.is_file() and _input_file_type(path) == qtype:
            out.append(_file_info(qtype, path, reused=True))
            continue
        r = quantize(QuantizeConfig(input=config.input, output=path, type=qtype, threads=config.quant_threads),
                     show_progress=config.show_progress)
        fallback: dict[str, int] = {}
        for t in r.fallbacks:
            fallback[t.type] = fallback.get(t.type, 0) + 1
        out.append(QuantFile(qtype, path, r.size_bytes, r.bits_per_weight, reused=False, seconds=r.seconds,
                             matrices=sum(len(t.shape) >= 2 for t in r.tensors), fallback=fallback))
    return out


@dataclass
class QuantRow:
    file: QuantFile
    stats: dict
    prompt_tps: float
    prompt_tps_stdev: float
    gen: dict | None

    def to_dict(self) -> dict:
        f = self.file
        return {"type": f.type, "path": str(f.path), "size_bytes": f.size_bytes,
                "bits_per_weight": round(f.bits_per_weight, 4), "reused": f.reused,
                "quantize_seconds": round(f.seconds, 2), "fallback_matrices": dict(f.fallback), **self.stats,
                "prompt_tokens_per_second": round(self.prompt_tps, 2),
                "prompt_tokens_per_second_stdev": round(self.prompt_tps_stdev, 2),
                "generation": self.gen}


@dataclass
class QuantReport:
    input: str
    reference: dict
    ctx: int
    chunks: int
    tokens_scored: int
    text_tokens: int
    tokens_sha256: str
    rows: list[QuantRow]
    seconds: float
    notes: list[str] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"input": self.input, "reference": self.reference, "ctx": self.ctx, "chunks": self.chunks,
                "tokens_scored": self.tokens_scored, "text_tokens": self.text_tokens,
                "tokens_sha256": self.tokens_sha256, "rows": [r.to_dict() for r in self.rows],
                "seconds": round(self.seconds, 2), "notes": self.notes,
                "method": "llama.cpp perplexity windows; KL(reference || type) per scored token, float64, in-process"}


def _stdev(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate_quants(config: QuantEvalConfig) -> QuantReport:
    """``cllama-deploy eval quant``: quantize, score every type against the reference, write the reports.

    Raises:
        ConfigError / InputError: bad options or inputs; ShapeMismatchError: the reference's vocabulary
        differs from the GGUF's.
    """
    t0 = time.perf_counter()
    text = read_text(config.text)
    files = prepare_files(config)
    notes: list[str] = [n for n in (f.fallback_note() for f in files) if n]
    n_ctx = max(config.ctx, config.gen_tokens + 1)
    with contextlib.ExitStack() as stack:
        ref_path = config.reference or config.input
        if model_kind(ref_path) == "gguf":
            ref = LlamaCppScorer(ref_path, n_ctx=n_ctx, n_threads=config.n_threads, kv_type=config.kv_cache_type)
        else:
            ref = open_scorer(ref_path, config, n_ctx=n_ctx, flag="--reference")
        stack.callback(ref.close)
        cands = []
        for f in files:
            if ref.kind == "gguf" and f.path.resolve() == Path(ref_path).resolve():
                cands.append(ref)  # the reference file itself (F16 → F16): its logits are computed once
                continue
            s = LlamaCppScorer(f.path, n_ctx=n_ctx, n_threads=config.n_threads, kv_type=config.kv_cache_type)
            stack.callback(s.close)
            cands.append(s)
        tokens = cands[0].tokenize(text, add_bos=True)
        if ref.kind == "hf":
            own = ref.tokenize(text, add_bos=True)
            if own != tokens:
                diff = next((i for i, (a, b) in enumerate(zip(own, tokens)) if a != b), min(len(own), len(tokens)))
                notes.append(f"the reference's tokenizer splits the text differently from the GGUF's (first difference "
                             f"at token {diff}); both were scored on the GGUF's token ids")
        if ref.n_vocab != cands[0].n_vocab:
            raise ShapeMismatchError(f"the reference has {ref.n_vocab} output rows but the GGUF {cands[0].n_vocab}; "
                                     "compare models with the same vocabulary (--reference, --lora, --tokenizer)")
        win = windows(tokens, config.ctx, config.chunks, cands[0].bos_id, cands[0].add_bos)
        first = first_scored(config.ctx)
        n_scored = config.ctx - 1 - first
        stats = [KLStats() for _ in cands]
        bar = task = None
        if config.show_progress:
            from cllama_deploy.progress import progress

            bar = stack.enter_context(progress(transient=True))
            task = bar.add_task("scoring windows", total=len(win))
        for i, w in enumerate(win):
            base = ref.window_logits(w, first)[:n_scored]
            targets = w[first + 1:]
            for s, st in zip(cands, stats):
                st.add(base, base if s is ref else s.window_logits(w, first)[:n_scored], targets)
            if bar is not None:
                bar.update(task, completed=i + 1)
        rows = []
        for f, s, st in zip(files, cands, stats):
            gen = None
            if config.gen_tokens and config.speed_reps:
                from cllama_deploy.evaluation.bench import SpeedRunner, tg_speed

                if bar is not None:
                    bar.update(task, description=f"generation speed {f.type}")
                sp = tg_speed(SpeedRunner(s.lm), config.gen_tokens, config.speed_reps, s.n_threads)
                gen = {"test": sp.test, "tokens_per_second": round(sp.mean, 2), "stdev": round(sp.stdev, 2),
                       "reps": config.speed_reps}
            rates = s.timing.rates()
            rows.append(QuantRow(f, st.summary(), s.timing.tokens_per_second, _stdev(rates), gen))
        ref_summary = stats[0].summary()
        reference = {"model": str(ref_path), "backend": ref.kind, "ppl": ref_summary["ppl_base"],
                     "ppl_stderr": ref_summary["ppl_base_stderr"],
                     "prompt_tokens_per_second": round(ref.timing.tokens_per_second, 2)}
    report = QuantReport(input=str(config.input), reference=reference, ctx=config.ctx, chunks=len(win),
                         tokens_scored=len(win) * n_scored, text_tokens=len(tokens), tokens_sha256=tokens_digest(tokens),
                         rows=rows, seconds=time.perf_counter() - t0, notes=notes)
    write_outputs(report, config)
    return report


# ------------------------------------------------------------------------------------ outputs

def _pm(value: float, unc: float, digits: int = 4) -> str:
    return f"{value:.{digits}f} ± {unc:.{digits}f}"


def _small(value: float) -> str:
    """Six decimals, or three significant digits for the tiny values of near-lossless types."""
    return f"{value:.6f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


def table_rows(report: QuantReport) -> list[dict[str, str]]:
    """The report's main table as strings (shared by the terminal table and Markdown)."""
    out = []
    for r in report.rows:
        s, f = r.stats, r.file
        gen = f"{r.gen['tokens_per_second']:.2f} ± {r.gen['stdev']:.2f}" if r.gen else "-"
        out.append({
            "type": f.type, "size MiB": f"{f.size_bytes / 2**20:.1f}", "bpw": f"{f.bits_per_weight:.2f}",
            "PPL": _pm(s["ppl"], s["ppl_stderr"]), "PPL ratio": _pm(s["ppl_ratio"], s["ppl_ratio_stderr"]),
            "mean KLD": f"{_small(s['kld_mean'])} ± {_small(s['kld_stderr'])}",
            "KLD 99%": _small(s["kld_percentiles"]["99"]),
            "same top p %": _pm(100 * s["same_top_p"], 100 * s["same_top_p_stderr"], 2),
            "RMS Δp %": _pm(100 * s["rms_dp"], 100 * s["rms_dp_stderr"], 3),
            "prompt t/s": f"{r.prompt_tps:.1f}", "gen t/s": gen,
        })
    return out


def markdown(report: QuantReport) -> str:
    rows = table_rows(report)
    ref = report.reference
    lines = [f"# Quantization report: {Path(report.input).name}", "",
             f"Reference: `{ref['model']}` ({ref['backend']}), PPL {_pm(ref['ppl'], ref['ppl_stderr'])}; "
             f"{report.chunks} windows of {report.ctx} tokens, {report.tokens_scored} tokens scored "
             f"(llama.cpp's perplexity method).", ""]
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", "KL divergence percentiles per type:", ""]
    pcts = ["max", "99.9", "99", "95", "90", "50", "10", "5", "1", "0.1", "min"]
    lines += ["| type | " + " | ".join(pcts) + " |", "|" + "|".join("---" for _ in range(len(pcts) + 1)) + "|"]
    for r in report.rows:
        s = r.stats
        vals = [s["kld_max"]] + [s["kld_percentiles"][p] for p in pcts[1:-1]] + [s["kld_min"]]
        lines.append(f"| {r.file.type} | " + " | ".join(_small(v) for v in vals) + " |")
    for n in report.notes:
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def plot(report: QuantReport, path: Path) -> None:
    """PNG: file size (MiB) against mean KL divergence, one labelled point per type."""
    from cllama_deploy.errors import require
    from cllama_deploy.files import atomic_path

    require("matplotlib", "eval")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.file.size_bytes / 2**20 for r in report.rows]
    ys = [r.stats["kld_mean"] for r in report.rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.errorbar(xs, ys, yerr=[r.stats["kld_stderr"] for r in report.rows], fmt="o")
    for x, y, r in zip(xs, ys, report.rows):
        ax.annotate(r.file.type, (x, y), textcoords="offset points", xytext=(5, 5))
    positive = [y for y in ys if y > 0]
    if positive:
        ax.set_yscale("symlog", linthresh=min(positive) / 2)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence from the reference (nats/token)")
    ax.set_title(f"{Path(report.input).name}: size vs KL divergence ({report.tokens_scored} tokens)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_outputs(report: QuantReport, config: QuantEvalConfig) -> None:
    if config.json_path is not None:
        write_text_atomic(config.json_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        report.outputs["json"] = str(config.json_path)
    if config.markdown is not None:
        write_text_atomic(config.markdown, markdown(report))
        report.outputs["markdown"] = str(config.markdown)
    if config.plot is not None:
        plot(report, Path(config.plot))
        report.outputs["plot"] = str(config.plot)
