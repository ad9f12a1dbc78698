"""Perplexity the way llama.cpp's ``llama-perplexity`` computes it, for a GGUF or an HF model with adapters.

llama.cpp's method (``tools/perplexity/perplexity.cpp``, ``perplexity()``), followed exactly:

1. the whole text is tokenized once, with BOS first when the vocabulary adds one;
2. it is cut into non-overlapping windows of ``ctx`` tokens (``len(tokens) // ctx`` of them, at most
   ``--chunks``; the remainder is dropped; fewer than ``2 * ctx`` tokens is an error);
3. the first token of every window is replaced by BOS and the window is evaluated from an empty cache;
4. only the second half is scored: the logits at positions ``ctx//2 .. ctx-2`` predict the tokens at
   ``ctx//2 + 1 .. ctx-1``, so each window contributes ``ctx - 1 - ctx//2`` negative log-likelihoods;
5. ``ppl = exp(mean nll)`` with the uncertainty ``ppl * sqrt((mean(nll²) - mean(nll)²) / (count - 1))``
   (the standard error of the mean log-likelihood, carried through ``exp``), as llama.cpp prints it
   (``Final estimate: PPL = … +/- …``).

The same windows and the same statistics serve the quantization report (``evaluation.quant``).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cllama_deploy.errors import ConfigError, InputError
from cllama_deploy.evaluation.models import ModelOptions, model_kind, open_scorer
from cllama_deploy.evaluation.stats import MeanStat, nll_of
from cllama_deploy.options import option


@dataclass(kw_only=True)
class PplConfig(ModelOptions):
    """Options of ``cllama-deploy eval ppl``."""

    model: Path = option(help="GGUF file, or an HF model directory (with --lora adapters).", argument=True,
                         metavar="MODEL")
    text: Path = option(help="UTF-8 text file to score.")
    ctx: int = option(512, "Window length in tokens (llama-perplexity's -c).")
    chunks: int | None = option(None, "Score at most this many windows (llama-perplexity's --chunks).",
                                default_text="all that fit")
    json_path: Path | None = option(None, "Write the report as JSON to this file.", flag="--json",
                                    default_text="no JSON")
    show_progress: bool = option(True, "No progress bar on stderr.", flag=("--quiet", "-q"), invert=True)

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        model_kind(self.model)
        self._check_model_options()
        self.text = Path(self.text)
        if not self.text.is_file():
            raise ConfigError(f"--text {self.text}: no such file")
        check_window(self.ctx, self.chunks)


def check_window(ctx: int, chunks: int | None) -> None:
    if ctx < 8:
        raise ConfigError(f"--ctx must be >= 8 tokens, got {ctx}")
    if chunks is not None and chunks < 1:
        raise ConfigError(f"--chunks must be >= 1, got {chunks}")


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--text {path}: not UTF-8 text ({exc})") from exc


def first_scored(ctx: int) -> int:
    """Position of the first logit row that is scored (llama.cpp: ``n_ctx / 2``)."""
    return ctx // 2


def windows(tokens: Sequence[int], ctx: int, chunks: int | None, bos_id: int, add_bos: bool) -> list[list[int]]:
    """llama.cpp's windows: non-overlapping, ``ctx`` tokens each, the first replaced by BOS.

    Raises:
        InputError: the text has fewer than ``2 * ctx`` tokens.
    """
    if len(tokens) < 2 * ctx:
        raise InputError(f"the text tokenizes to {len(tokens)} tokens; perplexity with --ctx {ctx} needs at least "
                         f"{2 * ctx} (two windows); give a longer --text or a smaller --ctx")
    n = len(tokens) // ctx
    if chunks is not None:
        n = min(n, chunks)
    out = []
    for i in range(n):
        w = list(tokens[i * ctx:(i + 1) * ctx])
        if add_bos:
            w[0] = bos_id
        out.append(w)
    return out


@dataclass
class PplResult:
    """Perplexity of one model on one text."""

    model: str
    backend: str
    ppl: float
    ppl_stderr: float
    nll: float
    nll_stderr: float
    tokens_scored: int
    chunks: int
    ctx: int
    text_tokens: int
    tokens_sha256: str
    seconds: float
    tokens_per_second: float
    running_ppl: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "backend": self.backend, "ppl": self.ppl, "ppl_stderr": self.ppl_stderr,
            "nll": self.nll, "nll_stderr": self.nll_stderr, "tokens_scored": self.tokens_scored,
            "chunks": self.chunks, "ctx": self.ctx, "text_tokens": self.text_tokens,
            "tokens_sha256": self.tokens_sha256, "seconds": round(self.seconds, 3),
            "prompt_tokens_per_second": round(self.tokens_per_second, 2), "running_ppl": self.running_ppl,
            "method": "llama.cpp perplexity: non-overlapping windows, BOS first, second half scored",
        }


def tokens_digest(tokens: Sequence[int]) -> str:
    """SHA256 of the token ids (int32 little-endian), to check that two runs scored the same ids."""
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


def scored_windows(scorer, tokens: Sequence[int], ctx: int, chunks: int | None) -> Iterator[tuple[np.ndarray, list[int]]]:
    """For each window: the scored logit rows and the tokens they predict."""
    first = first_scored(ctx)
    for w in windows(tokens, ctx, chunks, scorer.bos_id, scorer.add_bos):
        logits = scorer.window_logits(w, first)[: ctx - 1 - first]
        yield logits, w[first + 1:]


def perplexity_of_tokens(scorer, tokens: Sequence[int], ctx: int, chunks: int | None = None,
                         on_chunk: Callable[[int, int, float], None] | None = None) -> PplResult:
    """llama.cpp's perplexity of ``tokens`` (already tokenized, BOS first) under ``scorer``."""
    t0 = time.perf_counter()
    stat = MeanStat()
    running: list[float] = []
    n = min(len(tokens) // ctx, chunks or len(tokens))
    for i, (logits, targets) in enumerate(scored_windows(scorer, tokens, ctx, chunks)):
        stat.add(nll_of(logits, targets))
        running.append(math.exp(stat.mean))
        if on_chunk is not None:
            on_chunk(i + 1, n, running[-1])
    ppl = math.exp(stat.mean)
    return PplResult(
        model=scorer.name, backend=scorer.kind, ppl=ppl, ppl_stderr=ppl * stat.stderr, nll=stat.mean,
        nll_stderr=stat.stderr, tokens_scored=stat.count, chunks=len(running), ctx=ctx, text_tokens=len(tokens),
        tokens_sha256=tokens_digest(tokens), seconds=time.perf_counter() - t0,
        tokens_per_second=scorer.timing.tokens_per_second, running_ppl=[round(x, 6) for x in running],
    )


def _run(config: PplConfig, text: str) -> PplResult:
    import contextlib

    scorer = open_scorer(config.model, config, n_ctx=config.ctx)
    try:
        tokens = scorer.tokenize(text, add_bos=True)
        with contextlib.ExitStack() as stack:
            if not config.show_progress:
                return perplexity_of_tokens(scorer, tokens, config.ctx, config.chunks, None)
            from cllama_deploy.progress import progress

            bar = stack.enter_context(progress(transient=True))
            task = bar.add_task(f"perplexity {scorer.name}", total=None)

            def on_chunk(i: int, n: int, ppl: float) -> None:
                bar.update(task, completed=i, total=n, description=f"perplexity {scorer.name}: {ppl:.4f}")

            return perplexity_of_tokens(scorer, tokens, config.ctx, config.chunks, on_chunk)
    finally:
        scorer.close()


def perplexity(config: PplConfig) -> PplResult:
    """``cllama-deploy eval ppl``: llama.cpp's perplexity of ``config.model`` on ``config.text``; the report goes
    to ``config.json_path`` too when set.

    Raises:
        ConfigError / InputError: bad options, unreadable text, text shorter than two windows.
    """
    result = _run(config, read_text(config.text))
    if config.json_path is not None:
        import json

        from cllama_deploy.files import write_text_atomic

        write_text_atomic(config.json_path, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return result


def perplexity_of_text(model, text: str, *, ctx: int = 512, chunks: int | None = None, lora: Sequence = (),
                       **options) -> PplResult:
    """In-process perplexity of a string (same method and options as :func:`perplexity`, no file needed).

    ``options`` are the other :class:`PplConfig` fields (``tokenizer``, ``threads``, ``kv_cache_type``, ``hf_dtype``).
    """
    if not isinstance(text, str) or not text:
        raise InputError("perplexity_of_text needs a non-empty string")
    options.setdefault("show_progress", False)
    cfg = _InlineConfig(model=Path(model), text=None, ctx=ctx, chunks=chunks, lora=list(lora), **options)
    return _run(cfg, text)


@dataclass(kw_only=True)
class _InlineConfig(PplConfig):
    def __post_init__(self) -> None:  # no --text file
        model_kind(self.model)
        self._check_model_options()
        check_window(self.ctx, self.chunks)
