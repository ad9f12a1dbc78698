"""Per-sequence state: everything one choice needs between decode steps.

A :class:`Sequence` is one choice of one request: its prompt, the tokens generated so far, its
sampler chain, the UTF-8/stop-string assembler, limits, log-probabilities, deadline, cancellation
and timing, and the stream its chunks go to. The scheduler owns the decode loop and calls
:meth:`Sequence.accept` with each token it samples for the sequence; the sequence decides what the
client sees (chunks, the final chunk with usage) and whether it goes on. Nothing here calls
llama.cpp except through the sampler and logits the scheduler passes in.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from cllama_deploy.engine.base import Chunk, GenerationRequest, TokenLogprob, TopLogprob, Usage
from cllama_deploy.engine.detok import TextAssembler
from cllama_deploy.engine.stream import ChunkStream


class State(enum.Enum):
    WAITING = "waiting"  # in the queue, no slot yet
    ADMITTED = "admitted"  # has a slot; its KV is set up at the next step
    FOLLOWING = "following"  # waits for another sequence to compute the prompt prefix it shares
    PREFILL = "prefill"  # prompt being decoded, chunk by chunk
    DECODE = "decode"  # generating: one token per step
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    """One choice being generated. ``limit`` is the most tokens it may generate."""

    request: GenerationRequest
    stream: ChunkStream
    limit: int
    group: "Group"
    index: int = 0  # choice index within its group
    seq_id: int = -1
    state: State = State.WAITING
    sampler: object = None  # llama_api.Sampler, created when admitted
    n_past: int = 0  # tokens of this sequence in the KV cache
    pending: Optional[int] = None  # sampled, to be decoded at the next step
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens reused from the KV instead of computed
    leader: Optional["Sequence"] = None  # FOLLOWING: whose prefill this one waits for
    follow_len: int = 0  # FOLLOWING: prefix length to copy from the leader
    finish_reason: Optional[str] = None
    t_admitted: Optional[float] = None
    t_first: Optional[float] = None
    assembler: TextAssembler = None  # type: ignore[assignment]
    _held_ids: list[int] = field(default_factory=list)
    _held_lp: list[TokenLogprob] = field(default_factory=list)
    _prompt_lp: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.assembler = TextAssembler(self.request.params.stop)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_tokens

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def max_len(self) -> int:
        """Most KV cells this sequence can ever hold (the admission reservation)."""
        return self.n_prompt + self.limit

    @property
    def prompt_left(self) -> int:
        return self.n_prompt - self.n_past

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now > self.request.deadline

    @property
    def scores_prompt(self) -> bool:
        """Wants the prompt tokens' log-probabilities: its whole prompt is computed, with logits."""
        return self.request.params.prompt_logprobs is not None

    # -- prompt scoring (echo + logprobs) ------------------------------------------------------
    def score_prompt(self, start: int, n: int, logits: Callable[[int], np.ndarray],
                     pieces: list[bytes]) -> None:
        """Log-probabilities of the prompt tokens after positions ``start .. start+n-1`` just computed
        (``logits(j)``: the row of position ``start + j``)."""
        k = self.request.params.prompt_logprobs or 0
        for j in range(min(n, self.n_prompt - 1 - start)):
            self._prompt_lp.append(token_logprob(logits(j), self.prompt[start + j + 1], k, pieces))

    def send_prompt_logprobs(self) -> None:
        """The prompt's log-probabilities, once, on a chunk without text (the prompt is computed)."""
        self.stream.put(Chunk("", prompt_logprobs=self._prompt_lp))
        self._prompt_lp = []

    # -- generation ----------------------------------------------------------------------------
    def accept(self, token: int, is_eog: bool, piece: bytes,
               logits: Optional[Callable[[], np.ndarray]], pieces: list[bytes]) -> bool:
        """Take the token sampled for this sequence. Returns True to go on (the token is then
        decoded at the next step), False when the sequence finished (final chunk sent)."""
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        if is_eog:
            # A scored prompt (echo + logprobs, lm-eval's loglikelihood request with max_tokens 1) reports the
            # end-of-generation token with its log-probability, as OpenAI's legacy completions and vLLM do:
            # lm-eval takes the prompt's scores as every entry but the last, so without it the continuation's
            # last token would be dropped (scored 0) whenever the model would stop right after it.
            if self.scores_prompt and self.request.params.logprobs is not None and logits is not None \
                    and 0 <= token < len(pieces):
                self._held_ids.append(token)
                self._held_lp.append(token_logprob(logits(), token, self.request.params.logprobs, pieces))
            return self._finish("stop")
        self.generated.append(token)
        self._held_ids.append(token)
        k = self.request.params.logprobs
        if k is not None and logits is not None:
            self._held_lp.append(token_logprob(logits(), token, k, pieces))
        text = self.assembler.push(piece)
        if self.assembler.stopped:
            return self._finish("stop", text)
        if text:
            self._emit(text)
        if len(self.generated) >= self.limit:
            return self._finish("length")
        self.pending = token
        return True

    def _emit(self, text: str) -> None:
        want_lp = self.request.params.logprobs is not None
        self.stream.put(Chunk(text, self._held_ids, self._held_lp if want_lp else None))
        self._held_ids, self._held_lp = [], []

    def _finish(self, reason: str, text: Optional[str] = None) -> bool:
        if text is None:
            text = self.assembler.finish()
        now = time.monotonic()
        n_out = len(self.generated)
        t_first = self.t_first or now
        decode_s = now - t_first
        want_lp = self.request.params.logprobs is not None
        self.finish_reason = reason
        self.pending = None
        self.stream.put(Chunk(
            text, self._held_ids, self._held_lp if want_lp else None, finish_reason=reason,
            usage=Usage(self.n_prompt, n_out, self.cached_tokens),
            time_to_first_token=t_first - self.stream.submitted,
            tokens_per_second=(n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else None,
        ))
        self._held_ids, self._held_lp = [], []
        self.stream.end()
        return False


def token_logprob(logits: np.ndarray, token: int, k: int, pieces: list[bytes]) -> TokenLogprob:
    """Log-probability of ``token`` and of the ``k`` most likely tokens under ``logits``."""
    lg = logits.astype(np.float64)
    m = lg.max()
    lse = m + np.log(np.exp(lg - m).sum())
    top: list[TopLogprob] = []
    if k > 0:
        k = min(k, lg.shape[0])
        idx = np.argpartition(-lg, k - 1)[:k]
        idx = idx[np.argsort(-lg[idx], kind="stable")]
        top = [TopLogprob(int(i), pieces[int(i)], float(lg[i] - lse)) for i in idx]
    return TokenLogprob(token, pieces[token], float(lg[token] - lse), top)


@dataclass(eq=False)
class Group:
    """The choices of one client request: queued, counted and admitted as one request."""

    sequences: list[Sequence] = field(default_factory=list)
    started: bool = False  # at least one choice has a slot (the group no longer counts as waiting)

    @property
    def waiting(self) -> list[Sequence]:
        return [s for s in self.sequences if s.state is State.WAITING]
