"""The engine contract every caller talks to: requests, streamed chunks, errors, the Engine protocol.

An engine turns a :class:`GenerationRequest` (prompt token ids and sampling parameters) into a stream
of :class:`Chunk` objects whose text is always whole UTF-8 characters; the last chunk carries
``finish_reason`` and :class:`Usage`. The stream is iterable with ``async for`` from an event loop and
with ``for`` from any thread. How requests share the model (continuous batching, the prefix cache) is
the scheduler's business, hidden behind the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from typing import AsyncIterator, Iterator, Optional, Protocol, Sequence, runtime_checkable

from cllama_deploy.errors import CllamaError, InputError


# ---------------------------------------------------------------------------------------------
# Errors (the server maps each one to an OpenAI error object and HTTP status)
# ---------------------------------------------------------------------------------------------


class EngineError(CllamaError):
    """Generation failed inside the engine (a bug or a llama.cpp failure), not the client's fault."""


class ContextLengthExceeded(InputError):
    """The prompt (plus the requested completion) does not fit the context window."""

    def __init__(self, message: str, *, n_ctx: int, prompt_tokens: int, requested: int = 0,
                 param: str | None = None):
        super().__init__(message)
        self.n_ctx = n_ctx
        self.prompt_tokens = prompt_tokens
        self.requested = requested
        self.param = param


class InvalidRequest(InputError):
    """A request the engine cannot honour (bad token id, invalid grammar, empty prompt...).

    ``param`` names the request field to blame; ``code`` is an OpenAI error code (None: the server's
    default for invalid values)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(CllamaError):
    """Every slot is busy and ``--max-queue`` requests already wait; the client should retry later."""


class RequestTimeout(CllamaError):
    """The request ran past the per-request timeout (waiting in the queue included)."""


class EngineClosed(CllamaError):
    """The engine is shutting down and takes no new work."""


# ---------------------------------------------------------------------------------------------
# Requests and results
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy decoding.

    ``max_tokens=None`` generates until EOS, a stop string or the end of the context window.
    ``logprobs=None`` returns no log-probabilities; ``logprobs=k`` returns the chosen token's and the
    ``k`` most likely tokens' log-probabilities at each step (``k`` may be 0).
    ``grammar`` is GBNF text (llama.cpp grammar) that constrains the output.
    ``prompt_logprobs=k`` also scores the prompt: the log-probability of every prompt token after the
    first (and the ``k`` most likely tokens there), for ``echo`` with ``logprobs`` (lm-eval's
    loglikelihood). The whole prompt is then computed (no prefix-cache reuse), and ``max_tokens=0``
    still runs the prompt.
    """

    max_tokens: Optional[int] = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    logprobs: Optional[int] = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: Optional[str] = None
    prompt_logprobs: Optional[int] = None


@dataclass
class GenerationRequest:
    """One completion to generate: prompt token ids, sampling, and bookkeeping."""

    prompt_tokens: list[int]
    params: SamplingParams
    request_id: str = ""
    # time.monotonic() after which the request fails with RequestTimeout (queue wait included)
    deadline: Optional[float] = None


@dataclass
class TopLogprob:
    token_id: int
    token: bytes
    logprob: float


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and of the most likely alternatives."""

    token_id: int
    token: bytes
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class Usage:
    """Token counts of one choice. ``cached_tokens``: prompt tokens whose KV came from the prefix
    cache (or a sibling choice) instead of being computed (OpenAI's
    ``prompt_tokens_details.cached_tokens``)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """A piece of generated text (whole characters only) and the tokens that produced it.

    The last chunk of every stream has ``finish_reason`` (``"stop"`` or ``"length"``) and ``usage``;
    its text may be empty. ``logprobs`` has one entry per token in ``token_ids`` when requested.
    ``prompt_logprobs`` (with ``SamplingParams.prompt_logprobs``) comes once, on a chunk without text
    sent when the prompt has been computed: one entry per prompt token from the second on.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    # set on the final chunk: seconds from submission to the first token, and decode speed
    time_to_first_token: Optional[float] = None
    tokens_per_second: Optional[float] = None
    prompt_logprobs: Optional[list[TokenLogprob]] = None


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class ModelInfo:
    """What the server needs to know about a loaded model."""

    id: str
    path: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    chat_template: str
    chat_template_source: str  # "gguf", "override" or "default"
    bos_token: str
    eos_token: str
    add_bos: bool
    stop: list[str]  # stop strings implied by the chat template (e.g. Alpaca's "### Instruction:")
    created: int
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class GenerationStream(Protocol):
    """The chunks of one choice: ``async for`` from an event loop, ``for`` (blocking) from any thread.

    ``cancel()`` (or ``close()``/``aclose()`` before the end) stops the generation: a waiting request
    leaves the queue at once, a running one frees its slot at the next decode step; iteration then
    ends without a final chunk. Iterating past the request's deadline raises
    :class:`RequestTimeout`. ``final`` is the last chunk (with ``finish_reason``) once iterated.
    """

    cancelled: threading.Event
    final: Optional[Chunk]

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    def __iter__(self) -> Iterator[Chunk]: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """A loaded model that tokenizes, generates and embeds.

    ``generate`` (one choice) and ``submit`` (the choices of one request, queued and counted as one
    request, sharing the prompt's prefill) validate and enqueue synchronously, raising
    :class:`ContextLengthExceeded`, :class:`InvalidRequest`, :class:`QueueFull` or
    :class:`EngineClosed` right away, so a caller can still answer with a proper status; then they
    return the stream(s) to iterate. Neither needs a running event loop.
    """

    info: ModelInfo

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]: ...

    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    def token_piece(self, token_id: int) -> bytes: ...

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: Optional[list[dict]] = None) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> GenerationStream: ...

    def submit(self, requests: list[GenerationRequest]) -> list[GenerationStream]: ...

    async def embed(self, inputs: list[list[int]], *, deadline: float | None = None) -> Embeddings: ...

    def embed_sync(self, inputs: list[list[int]], *, deadline: float | None = None) -> Embeddings: ...

    def stats(self) -> dict: ...

    async def aclose(self) -> None: ...
