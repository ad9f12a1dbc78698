"""``cllama-deploy bench``: decode speed of a GGUF, llama-bench's way, next to what the memory allows.

Conventions of llama.cpp's ``llama-bench`` (``tools/llama-bench/llama-bench.cpp``):

- **pp N** (prompt processing): N random tokens (BOS first) decoded from an empty cache in batches of
  ``--n-batch``; **tg N** (text generation): N single-token decodes, BOS first then random tokens;
- one warm-up run before the timed ones (pp: the full prompt; tg: one token), the cache cleared before
  every repetition, ``--reps`` repetitions (default 5);
- tokens/s of each repetition, reported as their mean ± sample standard deviation.

Besides: **batched decoding**: B sequences decoding together, one token each per step in one llama.cpp
decode (what a server with B busy slots does), reported as aggregate tokens/s of the B streams; and the
**memory-bandwidth bound** of single-stream decoding: every generated token reads every weight once (the
token embedding only one row), so tg can not exceed (this machine's measured read bandwidth) / (bytes of
weights read per token).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cllama_deploy.errors import ConfigError
from cllama_deploy.options import option


def parse_int_list(values: Sequence[str] | None, flag: str, low: int = 1) -> list[int]:
    """``["1,2", "4"]`` → ``[1, 2, 4]`` (comma-separated or repeated flag values)."""
    out: list[int] = []
    for v in values or []:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise ConfigError(f"{flag} {v!r}: expected integers separated by commas, e.g. {flag} 1,2,4") from None
            if n < low:
                raise ConfigError(f"{flag} {n}: every value must be >= {low}")
            out.append(n)
    return out


@dataclass
class BenchConfig:
    """Options of ``cllama-deploy bench``."""

    model: Path = option(help="GGUF file to benchmark.", argument=True, metavar="MODEL.gguf")
    threads: list[str] = option([], "Thread counts to test, comma-separated or repeated (1,2).", flag="--threads",
                                default_text="$CLLAMA_N_THREADS or half the CPUs")
    batch: list[str] = option(["1", "2", "4", "8"], "Batch sizes of the batched-decoding test, comma-separated "
                              "or repeated; 0 skips it.", flag="--batch")
    n_prompt: int = option(512, "Prompt tokens of the pp test (llama-bench -p); 0 skips it.")
    n_gen: int = option(128, "Generated tokens of the tg test and per sequence in the batched test (llama-bench "
                        "-n); 0 skips them.")
    n_batch: int = option(2048, "Prompt tokens per llama.cpp decode call (llama-bench -b).")
    reps: int = option(5, "Repetitions of every test (llama-bench -r).")
    json_path: Path | None = option(None, "Write the report as JSON to this file.", flag="--json",
                                    default_text="no JSON")
    show_progress: bool = option(True, "No progress output on stderr.", flag=("--quiet", "-q"), invert=True)

    def __post_init__(self) -> None:
        from cllama_deploy.gguf.quantize import check_gguf_file

        self.model = Path(self.model)
        check_gguf_file(self.model, "MODEL.gguf")
        self.thread_counts = parse_int_list(self.threads, "--threads")
        if not self.thread_counts:
            from cllama_deploy.engine.threads import default_n_threads

            self.thread_counts = [default_n_threads()]
        self.batch_sizes = [b for b in parse_int_list(self.batch, "--batch", low=0) if b > 0]
        for flag, value, low in (("--n-prompt", self.n_prompt, 0), ("--n-gen", self.n_gen, 0),
                                 ("--n-batch", self.n_batch, 1), ("--reps", self.reps, 1)):
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if not (self.n_prompt or self.n_gen):
            raise ConfigError("nothing to measure: --n-prompt and --n-gen are both 0")


@dataclass
class Speed:
    """One llama-bench test: tokens per repetition and each repetition's seconds."""

    test: str
    threads: int
    tokens: int
    seconds: list[float]

    @property
    def samples(self) -> list[float]:
        return [self.tokens / s for s in self.seconds if s > 0]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    @property
    def stdev(self) -> float:
        """Sample standard deviation (llama-bench's ``stdev``; 0 for one repetition)."""
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"test": self.test, "threads": self.threads, "tokens": self.tokens,
                "tokens_per_second": round(self.mean, 3), "stdev": round(self.stdev, 3),
                "samples_ts": [round(x, 3) for x in self.samples], "samples_s": [round(x, 6) for x in self.seconds]}


def timed_reps(run: Callable[[], None], reps: int, warmup: Callable[[], None] | None = None) -> list[float]:
    """Seconds of ``reps`` runs after one warm-up run."""
    (warmup or run)()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        out.append(time.perf_counter() - t0)
    return out


class SpeedRunner:
    """pp and tg on one loaded model (:class:`~cllama_deploy.evaluation.models.LlamaCppModel`), with
    llama-bench's token choice (BOS first when the vocabulary adds one, then random ids)."""

    def __init__(self, lm, seed: int = 0):
        self.lm = lm
        self.rng = np.random.default_rng(seed)

    def _first(self) -> int:
        return self.lm.bos_id if self.lm.add_bos else int(self.rng.integers(self.lm.n_vocab))

    def prompt(self, n: int) -> None:
        tokens = [self._first()] + self.rng.integers(0, self.lm.n_vocab, n - 1).tolist()
        self.lm.ctx.clear()
        self.lm.decode_run(tokens, 0)

    def generate(self, n: int) -> None:
        self.lm.ctx.clear()
        token = self._first()
        for pos in range(n):
            self.lm.decode_run([token], pos)
            token = int(self.rng.integers(self.lm.n_vocab))


def pp_speed(runner: SpeedRunner, n: int, reps: int, threads: int) -> Speed:
    return Speed(f"pp{n}", threads, n, timed_reps(lambda: runner.prompt(n), reps))


def tg_speed(runner: SpeedRunner, n: int, reps: int, threads: int) -> Speed:
    return Speed(f"tg{n}", threads, n, timed_reps(lambda: runner.generate(n), reps, lambda: runner.generate(1)))


# ------------------------------------------------------------------------------------ memory bandwidth

def memory_bandwidth(threads: int = 1, size_bytes: int = 1 << 29, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: ``threads`` threads each take the max of their slice of a float32 buffer
    larger than any cache (numpy releases the GIL); the best of ``reps`` passes (peak, as STREAM reports)."""
    buf = np.full(size_bytes // 4, 1.0, dtype=np.float32)  # written, so every page is real memory
    parts = np.array_split(buf, threads)
    best = math.inf
    for _ in range(reps + 1):  # the first pass warms the page tables
        barrier = threading.Barrier(threads + 1)
        done: list[float] = []

        def work(a: np.ndarray) -> None:
            barrier.wait()
            a.max()

        ts = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        done.append(time.perf_counter() - t0)
        best = min(best, done[0])
    return buf.nbytes / best


@dataclass
class WeightBytes:
    """Bytes of weights one single-stream decode step reads."""

    total: int          # every tensor in the file
    per_token: int      # what one token reads: all but the token embedding, plus one embedding row

    def to_dict(self) -> dict:
        return {"tensor_bytes": self.total, "bytes_per_token": self.per_token}


def weight_bytes(path: Path) -> WeightBytes:
    """From the GGUF's tensor table: llama.cpp gathers one row of ``token_embd.weight`` per token (unless it
    is also the output matrix, when the embeddings are tied) and multiplies by every other weight."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    rows = {t.name: int(t.shape[1]) if len(t.shape) > 1 else 1 for t in reader.tensors}
    total = sum(sizes.values())
    per_token = total
    if "token_embd.weight" in sizes and "output.weight" in sizes:
        emb = sizes["token_embd.weight"]
        per_token = total - emb + emb // max(rows["token_embd.weight"], 1)
    return WeightBytes(total=total, per_token=per_token)


# ------------------------------------------------------------------------------------ report

@dataclass
class BenchResult:
    model: str
    size_bytes: int
    weights: WeightBytes
    speeds: list[Speed]
    batched: list[dict]
    bandwidth: dict[int, float]          # threads -> bytes/s
    seconds: float
    notes: list[str] = field(default_factory=list)

    def bound(self, threads: int) -> float:
        """Single-stream decode bound in tokens/s at ``threads`` threads."""
        return self.bandwidth[threads] / self.weights.per_token if self.weights.per_token else 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model, "size_bytes": self.size_bytes, **self.weights.to_dict(),
            "tests": [s.to_dict() for s in self.speeds],
            "batched": self.batched,
            "memory_bandwidth": [{"threads": t, "bytes_per_second": round(bw), "gb_per_second": round(bw / 1e9, 2),
                                  "tg_bound_tokens_per_second": round(self.bound(t), 2)}
                                 for t, bw in self.bandwidth.items()],
            "seconds": round(self.seconds, 2), "notes": self.notes,
            "method": "llama-bench: warm-up run, cache cleared per repetition, mean ± sample stdev of per-rep t/s",
        }


def bench(config: BenchConfig, *, on_step: Callable[[str], None] | None = None) -> BenchResult:
    """``cllama-deploy bench``: pp / tg / batched decoding tokens/s and the bandwidth bound.

    Raises:
        ConfigError / InputError: bad options or a file llama.cpp cannot load.
    """
    from cllama_deploy.evaluation.models import LlamaCppModel

    say = on_step or (lambda s: None)
    t0 = time.perf_counter()
    speeds: list[Speed] = []
    batched: list[dict] = []
    bandwidth: dict[int, float] = {}
    notes: list[str] = []
    n_ctx = max(config.n_prompt, config.n_gen, 16)
    for threads in config.thread_counts:
        lm = LlamaCppModel(config.model, n_ctx=n_ctx, n_threads=threads, n_batch=config.n_batch)
        try:
            runner = SpeedRunner(lm)
            if config.n_prompt:
                say(f"pp{config.n_prompt}, {threads} thread(s)")
                speeds.append(pp_speed(runner, config.n_prompt, config.reps, threads))
            if config.n_gen:
                say(f"tg{config.n_gen}, {threads} thread(s)")
                speeds.append(tg_speed(runner, config.n_gen, config.reps, threads))
        finally:
            lm.close()
        if config.n_gen and config.batch_sizes:
            batched.extend(batched_speeds(config, threads, say))
        say(f"memory bandwidth, {threads} thread(s)")
        bandwidth[threads] = memory_bandwidth(threads)
    result = BenchResult(model=config.model.name, size_bytes=config.model.stat().st_size,
                         weights=weight_bytes(config.model), speeds=speeds, batched=batched, bandwidth=bandwidth,
                         seconds=time.perf_counter() - t0, notes=notes)
    if config.json_path is not None:
        import json

        from cllama_deploy.files import write_text_atomic

        write_text_atomic(config.json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def batched_decode_speed(path: Path, *, batch: int, n_gen: int, reps: int, threads: int, seed: int = 0) -> Speed:
    """``batch`` sequences, each BOS then ``n_gen - 1`` random tokens, decoded together: every step is one
    llama.cpp decode of ``batch`` tokens (one per sequence, each with its logits). Aggregate tokens/s."""
    from cllama_deploy.evaluation.models import LlamaCppModel

    lm = LlamaCppModel(path, n_ctx=batch * (n_gen + 1), n_threads=threads, n_seq=batch)
    rng = np.random.default_rng(seed)
    first = lm.bos_id if lm.add_bos else int(rng.integers(lm.n_vocab))

    def run(steps: int) -> None:
        lm.ctx.clear()
        tokens = [first] * batch
        for pos in range(steps):
            lm.batch.clear()
            for s, t in enumerate(tokens):
                lm.batch.add_run(s, [t], pos, logits_last=True)
            lm.ctx.decode(lm.batch)
            tokens = rng.integers(0, lm.n_vocab, batch).tolist()

    try:
        seconds = timed_reps(lambda: run(n_gen), reps, lambda: run(1))
    finally:
        lm.close()
    return Speed(f"tg{n_gen}x{batch}", threads, batch * n_gen, seconds)


def batched_speeds(config: BenchConfig, threads: int, say: Callable[[str], None]) -> list[dict]:
    """Aggregate tokens/s of B sequences decoding together, for every B of ``--batch``."""
    out = []
    for b in config.batch_sizes:
        say(f"batched decoding, batch {b}, {threads} thread(s)")
        s = batched_decode_speed(config.model, batch=b, n_gen=config.n_gen, reps=config.reps, threads=threads)
        out.append({"batch": b, "threads": threads, "tokens": s.tokens, "tokens_per_second": round(s.mean, 3),
                    "stdev": round(s.stdev, 3), "per_sequence_tokens_per_second": round(s.mean / b, 3),
                    "samples_ts": [round(x, 3) for x in s.samples]})
    return out
