"""LlamaCppEngine: a GGUF model served through llama.cpp with continuous batching.

The engine validates requests, builds per-sequence state (:mod:`cllama_deploy.engine.sequence`) and
hands it to the :class:`~cllama_deploy.engine.scheduler.BatchScheduler`, which decodes every running
sequence in one ``llama_decode`` per step and reuses shared prompt prefixes from the KV cache. What
it controls that llama-cpp-python's ``create_completion`` does not: UTF-8-safe incremental text, stop
strings held back until confirmed, log-probabilities without ``logits_all``, cancellation between
steps, a grammar that cannot crash the process, several requests per decode, and prompt reuse across
requests. All llama.cpp calls go through :mod:`cllama_deploy.engine.llama_api`.

Embeddings use a second llama.cpp context on the same loaded weights with mean pooling: one vector
per input, the mean of the last hidden states over its tokens, L2-normalized; several inputs share
each decode call.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cllama_deploy.engine.base import (
    ContextLengthExceeded,
    EngineClosed,
    Embeddings,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    SamplingParams,
)
from cllama_deploy.engine.sequence import Group, Sequence as SeqState
from cllama_deploy.engine.stream import ChunkStream
from cllama_deploy.engine.threads import available_cpus, default_n_threads
from cllama_deploy.errors import ConfigError, InputError, require

log = logging.getLogger("cllama_deploy.engine")

DEFAULT_PARALLEL = 4
DEFAULT_PREFILL_CHUNK = 512
# the prefix cache (finished sequences' KV in host memory): at most this many entries, and at most as
# many bytes as the KV cache itself or this, whichever is less
PREFIX_CACHE_ENTRIES = 32
PREFIX_CACHE_BYTES = 1 << 30


@dataclass
class LlamaCppConfig:
    """How to load and serve one GGUF model.

    Args:
        model_path: the GGUF file (``cllama-deploy serve MODEL``).
        model_id: the name clients put in ``model`` (default: the file name without ``.gguf``).
        n_ctx: context window of one sequence (prompt + completion); 0 = the model's trained context.
        n_threads: llama.cpp threads; None picks half the CPUs (see ``engine.threads``).
        n_batch: most tokens in one decode step (generated tokens of every sequence + prompt chunks).
        chat_template: ``alpaca``, ``alpaca-2`` or a ``.jinja`` file overriding the GGUF's template.
        max_queue: requests that may WAIT for a slot; running requests do not count.
        embeddings: serve /v1/embeddings (a second, mean-pooling context, created on first use).
        parallel: slots: sequences decoded together in each step (choices of ``n > 1`` use one each).
        prefix_cache: reuse the KV of prompt prefixes shared with running or finished sequences.
        prefill_chunk: most prompt tokens per step while other sequences generate; the scheduler
            takes fewer when more would make the step over 1.8x slower than the generating sequences'
            step alone.
        kv_cache_type: element type of the KV cache, ``f16`` (llama.cpp's default) or ``f32``.
        flash_attn: llama.cpp's flash attention: ``off`` (default), ``on``, or ``auto`` (llama.cpp
            decides; on for CPUs). Steps are ~10 % cheaper on CPUs with it, but its result depends on
            how a prompt was split into steps (f16 accumulation, different kernels for prompt chunks
            and single tokens: log-probabilities move by ~1e-2 with an f16 cache), so with it on a
            request's output is no longer exactly what it is served alone; off keeps that guarantee.
    """

    model_path: str = field(metadata={"help": "GGUF file.", "argument": True})
    model_id: Optional[str] = field(default=None, metadata={
        "help": "Name clients put in `model`.", "default_text": "the file name without .gguf"})
    n_ctx: int = field(default=0, metadata={
        "help": "Context window of one sequence (prompt + completion); 0 = the model's trained context."})
    n_threads: Optional[int] = field(default=None, metadata={
        "help": "llama.cpp threads.", "flag": "--threads", "default_text": "half the CPUs"})
    n_batch: int = field(default=512, metadata={
        "help": "Most tokens in one llama.cpp decode step (all sequences together)."})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "alpaca, alpaca-2 or a .jinja file.", "default_text": "the GGUF's own template"})
    max_queue: int = field(default=64, metadata={
        "help": "Requests that may wait for a free slot; more get 429."})
    embeddings: bool = field(default=True, metadata={"help": "Serve /v1/embeddings."})
    parallel: int = field(default=DEFAULT_PARALLEL, metadata={
        "help": "Slots: sequences decoded together each step; the KV cache holds parallel × n_ctx tokens."})
    prefix_cache: bool = field(default=True, metadata={
        "help": "Reuse the KV cache of prompt prefixes shared with earlier or running requests.",
        "flag": "--prefix-cache/--no-prefix-cache"})
    prefill_chunk: int = field(default=DEFAULT_PREFILL_CHUNK, metadata={
        "help": "Most prompt tokens per step while other sequences generate (fewer when they would "
                "slow those sequences' step more than 1.8x)."})
    kv_cache_type: str = field(default="f16", metadata={
        "help": "KV cache element type: f16, or f32 (twice the memory; reference-exact logits).",
        "choices": ("f16", "f32")})
    flash_attn: str = field(default="off", metadata={
        "help": "Flash attention: off, on or auto (llama.cpp decides; on for CPUs). On makes outputs "
                "depend slightly on the rest of the batch.",
        "choices": ("auto", "on", "off")})

    def __post_init__(self) -> None:
        path = Path(self.model_path)
        if not path.is_file():
            raise ConfigError(f"model file {self.model_path!r} does not exist; pass a .gguf file")
        if self.model_id is None:
            self.model_id = path.name[:-5] if path.name.endswith(".gguf") else path.name
        if not self.model_id:
            raise ConfigError("the model id must not be empty (NAME=MODEL.gguf, or `id` in the settings "
                              "file)")
        if self.n_ctx < 0:
            raise ConfigError(f"--n-ctx must be >= 0 (0 = the model's trained context), got {self.n_ctx}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.n_threads}")
        if self.n_batch < 1:
            raise ConfigError(f"--n-batch must be >= 1, got {self.n_batch}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not 1 <= self.parallel <= 64:
            raise ConfigError(f"--parallel must be between 1 and 64, got {self.parallel}")
        if self.prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk must be >= 1, got {self.prefill_chunk}")
        if self.flash_attn not in ("auto", "on", "off"):
            raise ConfigError(f"--flash-attn must be auto, on or off, got {self.flash_attn!r}")
        if self.kv_cache_type not in ("f16", "f32"):
            raise ConfigError(f"--kv-cache-type must be f16 or f32, got {self.kv_cache_type!r}")
        if self.chat_template is not None:
            from cllama_deploy import prompts

            prompts.load_chat_template(self.chat_template)  # raises ConfigError naming the flag


class Runner:
    """What the scheduler's worker needs from llama.cpp: the context, the model, samplers and the
    embedding context (created on first use)."""

    def __init__(self, model, context, *, n_ctx: int, n_threads: int, kv_type: str = "f16"):
        self.model = model
        self.kv_type = kv_type
        self.context = context
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self._embed_ctx = None
        self._embed_lock = threading.Lock()

    def make_sampler(self, p: SamplingParams):
        from cllama_deploy.engine.llama_api import Sampler

        return Sampler(self.model, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                       min_p=p.min_p, typical_p=p.typical_p, repeat_penalty=p.repeat_penalty,
                       presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                       penalty_last_n=p.penalty_last_n, seed=p.seed,
                       logit_bias={int(k): float(v) for k, v in p.logit_bias.items()},
                       grammar=p.grammar)

    def embedding_context(self):
        """The mean-pooling context on the same weights (created on first use)."""
        from cllama_deploy.engine import llama_api

        with self._embed_lock:
            if self._embed_ctx is None:
                n = self.n_ctx
                self._embed_ctx = llama_api.Context(
                    self.model, n_ctx=n, n_batch=n, n_ubatch=n,
                    n_seq_max=min(64, llama_api.max_sequences()), n_threads=self.n_threads,
                    embeddings=True, kv_type=self.kv_type)
            return self._embed_ctx

    def embed(self, inputs: list[list[int]], cancelled) -> Optional[list[list[float]]]:
        from cllama_deploy.engine import llama_api

        return llama_api.embed_batches(self.embedding_context(), inputs, self.model.n_embd,
                                       cancelled)

    def close(self) -> None:
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self.context.close()
        self.model.close()


class LlamaCppEngine:
    """An :class:`~cllama_deploy.engine.base.Engine` on one GGUF file.

    ``LlamaCppEngine(config)`` (or :meth:`load`) loads the model (blocking; call from a thread when an
    event loop is running) and starts the scheduler's worker thread.
    """

    def __init__(self, config: LlamaCppConfig):
        require("llama_cpp", "all")
        from cllama_deploy.engine import llama_api
        from cllama_deploy.engine.scheduler import BatchScheduler

        self.config = config
        self.n_threads = config.n_threads or default_n_threads()
        try:
            model = llama_api.Model(config.model_path)
        except (llama_api.ModelLoadError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"llama.cpp could not load {config.model_path!r} ({exc}); is it a GGUF file written "
                "by `cllama-deploy convert` or llama.cpp?") from exc
        self.model = model
        self.n_vocab = model.n_vocab
        self.n_ctx = config.n_ctx or model.n_ctx_train
        self.bos_id, self.eos_id, self.add_bos = model.bos_id, model.eos_id, model.add_bos
        self.parallel = config.parallel
        n_seq_max = min(llama_api.max_sequences(), config.parallel)
        n_batch = min(config.n_batch, self.n_ctx * config.parallel)
        kv_bytes = self.n_ctx * config.parallel * model.kv_bytes_per_token(config.kv_cache_type)
        try:
            self.context = llama_api.Context(
                model, n_ctx=self.n_ctx * config.parallel, n_batch=n_batch, n_seq_max=n_seq_max,
                n_threads=self.n_threads, kv_type=config.kv_cache_type, kv_unified=False,
                flash_attn={"auto": None, "on": True, "off": False}[config.flash_attn])
        except llama_api.ModelLoadError as exc:
            model.close()
            raise InputError(f"{exc}: not enough memory for --parallel {config.parallel} × --n-ctx "
                             f"{self.n_ctx}; lower one of them") from exc
        self._runner = Runner(model, self.context, n_ctx=self.n_ctx, n_threads=self.n_threads,
                              kv_type=config.kv_cache_type)
        self.scheduler = BatchScheduler(
            self._runner, parallel=config.parallel, max_queue=config.max_queue, n_ctx=self.n_ctx,
            n_batch=n_batch, prefill_chunk=config.prefill_chunk, prefix_cache=config.prefix_cache,
            cache_entries=PREFIX_CACHE_ENTRIES, cache_bytes=min(PREFIX_CACHE_BYTES, kv_bytes),
            yield_cpu=self.n_threads >= available_cpus(), name=config.model_id)
        self._closed = False
        self._close_lock = threading.Lock()
        self.info = self._model_info()
        cache = (f"on (host memory, up to {min(PREFIX_CACHE_BYTES, kv_bytes) / 2**20:.0f} MiB)"
                 if config.prefix_cache else "off")
        log.info("loaded %s: n_ctx=%d per sequence (trained %d), %d slots, KV cache %d tokens "
                 "(%.0f MiB, a stream per slot), n_vocab=%d, threads=%d, prefix cache %s, chat template "
                 "from %s", config.model_id, self.n_ctx, model.n_ctx_train, config.parallel,
                 self.n_ctx * config.parallel, kv_bytes / 2**20, self.n_vocab, self.n_threads, cache,
                 self.info.chat_template_source)

    @classmethod
    def load(cls, config: LlamaCppConfig) -> "LlamaCppEngine":
        """Load the GGUF (blocking; call from a thread when an event loop is running)."""
        return cls(config)

    def _model_info(self) -> ModelInfo:
        from cllama_deploy import prompts
        from cllama_deploy.gguf.keys import CHAT_TEMPLATE

        meta = dict(self.model.metadata)
        if self.config.chat_template:
            template, source = prompts.load_chat_template(self.config.chat_template), "override"
        elif meta.get(CHAT_TEMPLATE):
            template, source = meta[CHAT_TEMPLATE], "gguf"
        else:
            template, source = prompts.FORMATS["alpaca"].chat_template, "default"
        fmt = prompts.format_of_template(template)
        stop = list(fmt.stop) if fmt else []
        return ModelInfo(
            id=self.config.model_id, path=str(self.config.model_path), n_ctx=self.n_ctx,
            n_ctx_train=self.model.n_ctx_train, n_vocab=self.n_vocab, n_embd=self.model.n_embd,
            chat_template=template, chat_template_source=source,
            bos_token=self.model.token_text(self.bos_id), eos_token=self.model.token_text(self.eos_id),
            add_bos=self.add_bos, stop=stop, created=int(os.path.getmtime(self.config.model_path)),
            metadata={k: v for k, v in meta.items() if k != CHAT_TEMPLATE},
        )

    # -- tokenizer -------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos and self.add_bos,
                                   special=special)

    def check_tokens(self, token_ids: Sequence[int], param: str = "prompt") -> None:
        for t in token_ids:
            if not (0 <= t < self.n_vocab):
                raise InvalidRequest(f"token id {t} is out of range: the model's vocabulary has "
                                     f"{self.n_vocab} tokens (ids 0..{self.n_vocab - 1})", param=param)

    def token_piece(self, token_id: int) -> bytes:
        return self.model.pieces[token_id]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        self.check_tokens(token_ids, "tokens")
        pieces = self.model.pieces
        return b"".join(pieces[t] for t in token_ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: Optional[list[dict]] = None) -> list[int]:
        """Render messages with the chat template and tokenize; BOS comes from the template.

        ``tools`` (OpenAI form) goes to a template that renders tools itself (engine/tools.py
        ``native_format``); None passes no ``tools`` variable.

        Templates that include ``bos_token`` (the Alpaca ones do) put the BOS text in the prompt,
        which tokenizes to the BOS id with special-token parsing; a template that does not gets one
        BOS prepended when the model adds BOS. Never two.
        """
        from jinja2 import TemplateError

        from cllama_deploy import prompts

        try:
            text = prompts.render_chat(self.info.chat_template, messages, bos_token=self.info.bos_token,
                                       eos_token=self.info.eos_token,
                                       add_generation_prompt=add_generation_prompt, tools=tools)
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template could not render these messages: {exc}",
                                 param="messages") from exc
        tokens = self.tokenize(text, add_bos=False, special=True)
        if self.add_bos and (not tokens or tokens[0] != self.bos_id):
            tokens.insert(0, self.bos_id)
        return tokens

    # -- generation ------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> int:
        """Raise before queueing if the request can never run; returns its completion limit."""
        prompt = request.prompt_tokens
        if not prompt:
            raise InvalidRequest("the prompt is empty (no tokens)", param="prompt")
        self.check_tokens(prompt)
        p = request.params
        n_prompt = len(prompt)
        if n_prompt >= self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens. However, your prompt "
                f"has {n_prompt} tokens, which leaves no room for a completion. Shorten the prompt or "
                "start the server with a larger --n-ctx.",
                n_ctx=self.n_ctx, prompt_tokens=n_prompt)
        if p.max_tokens is not None and n_prompt + p.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                f"{n_prompt + p.max_tokens} tokens ({n_prompt} in the prompt, {p.max_tokens} for the "
                "completion). Reduce the prompt or max_tokens.",
                n_ctx=self.n_ctx, prompt_tokens=n_prompt, requested=p.max_tokens, param="max_tokens")
        if p.max_tokens is not None and p.max_tokens < 0:
            raise InvalidRequest("max_tokens must be >= 0", param="max_tokens")
        for t in p.logit_bias:
            if not (0 <= t < self.n_vocab):
                raise InvalidRequest(f"logit_bias names token {t}, outside the vocabulary "
                                     f"(0..{self.n_vocab - 1})", param="logit_bias")
        if p.grammar is not None and not self.model.grammar_is_valid(p.grammar):
            raise InvalidRequest("the response_format could not be turned into a valid llama.cpp "
                                 "grammar", param="response_format")
        limit = self.n_ctx - n_prompt
        return limit if p.max_tokens is None else min(limit, p.max_tokens)

    def generate(self, request: GenerationRequest) -> ChunkStream:
        """One choice: validate, queue, and return its stream (no event loop needed)."""
        return self.submit([request])[0]

    def submit(self, requests: list[GenerationRequest]) -> list[ChunkStream]:
        """The choices of one request: validated together (nothing is queued if one is invalid),
        queued and counted as one request; choices with the same prompt share its prefill."""
        if self._closed:
            raise EngineClosed("the server is shutting down")
        if not requests:
            raise InvalidRequest("no choices to generate", param="n")
        if len(requests) > self.parallel * 64:
            raise InvalidRequest(f"too many choices in one request ({len(requests)})", param="n")
        limits = [self.validate(r) for r in requests]
        group = Group()
        for i, (r, limit) in enumerate(zip(requests, limits)):
            stream = ChunkStream(r.deadline, r.request_id)
            group.sequences.append(SeqState(r, stream, limit, group, index=i))
        self.scheduler.submit(group)
        return [s.stream for s in group.sequences]

    # -- embeddings ------------------------------------------------------------------------------
    def _embed_stream(self, inputs: list[list[int]], deadline: Optional[float]) -> ChunkStream:
        from cllama_deploy.engine.scheduler import EmbedJob

        if self._closed:
            raise EngineClosed("the server is shutting down")
        if not self.config.embeddings:
            raise InvalidRequest("embeddings are disabled for this model (`embeddings: false` in the "
                                 "settings file)", param="model")
        if not inputs:
            raise InvalidRequest("input is empty", param="input")
        for i, toks in enumerate(inputs):
            if not toks:
                raise InvalidRequest(f"input[{i}] is empty (no tokens)", param="input")
            self.check_tokens(toks, "input")
            if len(toks) > self.n_ctx:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.n_ctx} tokens, but input[{i}] has "
                    f"{len(toks)} tokens. Shorten the input.", n_ctx=self.n_ctx,
                    prompt_tokens=len(toks), param="input")
        stream = ChunkStream(deadline)
        self.scheduler.submit_embed(EmbedJob([list(t) for t in inputs], stream))
        return stream

    async def embed(self, inputs: list[list[int]], *, deadline: float | None = None) -> Embeddings:
        result = await self._embed_stream(inputs, deadline).aresult()
        if result is None:
            from cllama_deploy.engine.base import EngineError

            raise EngineError("embedding was cancelled")
        return result

    def embed_sync(self, inputs: list[list[int]], *, deadline: float | None = None) -> Embeddings:
        """Blocking :meth:`embed`, from any thread."""
        result = self._embed_stream(inputs, deadline).result()
        if result is None:
            from cllama_deploy.engine.base import EngineError

            raise EngineError("embedding was cancelled")
        return result

    @property
    def embedding_context(self):
        """The llama.cpp context embeddings decode in (its ``decode_hook`` sees their decodes)."""
        return self._runner.embedding_context()

    # -- state -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return self.scheduler.stats()

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, let queued and running ones finish (up to ``timeout`` s), free."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.scheduler.close(timeout):
            self._runner.close()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close, 30.0)
