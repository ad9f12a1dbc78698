"""Running requests against an engine and comparing outputs token by token."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Optional

from cllama_deploy.engine import GenerationRequest, SamplingParams

NEAR_TIE = 1e-4


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Optional[str] = None
    cached: int = 0
    chunks: int = 0


def random_prompt(rng: random.Random, n: int, bos: int = 1, vocab: int = 1000) -> list[int]:
    return [bos] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def consume(stream, cancel_after: Optional[int] = None) -> Outcome:
    """Iterate (blocking) a stream; with ``cancel_after``, cancel once that many chunks arrived."""
    out = Outcome()
    for chunk in stream:
        out.chunks += 1
        out.tokens.extend(chunk.token_ids)
        if chunk.logprobs:
            out.logprobs.extend(lp.logprob for lp in chunk.logprobs)
        if chunk.finish_reason:
            out.finish, out.cached = chunk.finish_reason, chunk.usage.cached_tokens
        if cancel_after is not None and out.chunks >= cancel_after:
            stream.cancel()
            break
    return out


def serve_alone(engine, prompt: list[int], params: SamplingParams, n: int = 1) -> list[Outcome]:
    streams = engine.submit([GenerationRequest(prompt, params) for _ in range(n)])
    return [consume(s) for s in streams]


def consume_in_threads(jobs) -> list:
    """``jobs``: (stream, cancel_after) pairs, consumed concurrently; returns outcomes in order."""
    results: list = [None] * len(jobs)

    def run(i, stream, cancel_after):
        results[i] = consume(stream, cancel_after)

    threads = [threading.Thread(target=run, args=(i, s, c)) for i, (s, c) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def first_difference(a: list[int], b: list[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logit_gap(engine, prompt: list[int], params: SamplingParams, prefix: list[int], t1: int,
              t2: int) -> float:
    """|logit(t1) - logit(t2)| at the position after ``prompt + prefix``, from ``engine`` alone."""
    import dataclasses

    p = dataclasses.replace(params, max_tokens=1, temperature=0.0, logprobs=engine.n_vocab,
                            grammar=None, logit_bias={})
    lp: dict[int, float] = {}
    for chunk in engine.generate(GenerationRequest(prompt + prefix, p)):
        for entry in chunk.logprobs or []:
            lp = {t.token_id: t.logprob for t in entry.top}
    return abs(lp[t1] - lp[t2])
