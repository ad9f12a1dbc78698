"""LlamaCppEngine: a GGUF model served through llama-cpp-python.

Generation runs our own token loop on the ``Llama`` object (``Llama.eval`` for decoding, a llama.cpp
sampler chain we build per request) so that we control what llama-cpp-python's ``create_completion``
does not: UTF-8-safe incremental text, stop strings held back until confirmed, log-probabilities
without ``logits_all``, cancellation between tokens, a grammar that cannot crash the process, and
prompt-prefix reuse of the KV cache between requests (multi-turn chat re-sends the history).

Embeddings use a second llama.cpp context on the same file (memory-mapped, so the weights are shared)
with mean pooling: one vector per input, the mean of the last hidden states over its tokens,
L2-normalized.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cllama_deploy.engine.base import (
    Chunk,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    RequestTimeout,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from cllama_deploy.engine.detok import TextAssembler
from cllama_deploy.engine.scheduler import EventStream, Job, SerialScheduler
from cllama_deploy.engine.threads import default_n_threads
from cllama_deploy.errors import ConfigError, InputError, require

log = logging.getLogger("cllama_deploy.engine")


@dataclass
class LlamaCppConfig:
    """How to load one GGUF model.

    Args:
        model_path: the GGUF file (``cllama-deploy serve MODEL``).
        model_id: the name clients put in ``model`` (default: the file name without ``.gguf``).
        n_ctx: context window in tokens (``--n-ctx``); 0 means the model's trained context.
        n_threads: llama.cpp threads (``--threads``); None picks a default that does not collapse
            when other processes share the CPU (half the CPUs, see ``engine.threads``).
        n_batch: prompt tokens decoded per llama.cpp call (``--n-batch``).
        chat_template: ``alpaca``, ``alpaca-2`` or a ``.jinja`` file overriding the GGUF's template
            (``--chat-template``).
        max_queue: requests allowed to wait while one is generating (``--max-queue``).
        embeddings: serve /v1/embeddings (a second, mean-pooling context, created on first use).
    """

    model_path: str
    model_id: Optional[str] = None
    n_ctx: int = 0
    n_threads: Optional[int] = None
    n_batch: int = 512
    chat_template: Optional[str] = None
    max_queue: int = 64
    embeddings: bool = True

    def __post_init__(self) -> None:
        path = Path(self.model_path)
        if not path.is_file():
            raise ConfigError(f"model file {self.model_path!r} does not exist; pass a .gguf file")
        if self.model_id is None:
            self.model_id = path.name[:-5] if path.name.endswith(".gguf") else path.name
        if not self.model_id:
            raise ConfigError("the model id must not be empty (NAME in NAME=MODEL.gguf, or `id:` in the settings file)")
        if self.n_ctx < 0:
            raise ConfigError(f"--n-ctx must be >= 0 (0 = the model's trained context), got {self.n_ctx}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.n_threads}")
        if self.n_batch < 1:
            raise ConfigError(f"--n-batch must be >= 1, got {self.n_batch}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.chat_template is not None:
            from cllama_deploy import prompts

            prompts.load_chat_template(self.chat_template)  # raises ConfigError naming the flag


def _quiet_llama_logs() -> None:
    """Route llama.cpp's C-side logging to Python's logger at debug level (it is very chatty)."""
    import llama_cpp

    try:
        from llama_cpp import _logger  # noqa: F401  (installs llama-cpp-python's log callback)
    except Exception:  # pragma: no cover
        pass
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    del llama_cpp


class LlamaCppEngine:
    """An :class:`~cllama_deploy.engine.base.Engine` on one GGUF file. Create with :meth:`load`."""

    def __init__(self, config: LlamaCppConfig, llm, scheduler=None):
        import llama_cpp

        self.config = config
        self._lc = llama_cpp
        self._llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = llm.n_ctx()
        self.bos_id = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)) and self.bos_id >= 0
        self._pieces = [self._piece(i) for i in range(self.n_vocab)]
        self._eog = np.array(
            [bool(llama_cpp.llama_vocab_is_eog(self._vocab, i)) for i in range(self.n_vocab)]
        )
        self.scheduler = scheduler or SerialScheduler(config.max_queue, name=config.model_id)
        self._embed_llm = None
        self._embed_lock = threading.Lock()
        self._cancelled = 0
        self._closed = False
        self.info = self._model_info()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: LlamaCppConfig) -> "LlamaCppEngine":
        """Load the GGUF (blocking; call from a thread when an event loop is running)."""
        require("llama_cpp", "all")
        import llama_cpp

        _quiet_llama_logs()
        n_threads = config.n_threads or default_n_threads()
        try:
            llm = llama_cpp.Llama(
                model_path=str(config.model_path), n_ctx=config.n_ctx, n_batch=config.n_batch,
                n_ubatch=config.n_batch, n_threads=n_threads, n_threads_batch=n_threads,
                verbose=False, logits_all=False, embedding=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise InputError(
                f"llama.cpp could not load {config.model_path!r} ({exc}); is it a GGUF file written "
                "by `cllama-deploy convert` or llama.cpp?"
            ) from exc
        engine = cls(config, llm)
        engine.n_threads = n_threads
        log.info("loaded %s: n_ctx=%d (trained %d), n_vocab=%d, threads=%d, chat template from %s",
                 config.model_id, engine.n_ctx, engine.info.n_ctx_train, engine.n_vocab, n_threads,
                 engine.info.chat_template_source)
        return engine

    def _model_info(self) -> ModelInfo:
        from cllama_deploy import prompts

        llm = self._llm
        meta = dict(getattr(llm, "metadata", {}) or {})
        if self.config.chat_template:
            template, source = prompts.load_chat_template(self.config.chat_template), "override"
        elif meta.get("tokenizer.chat_template"):
            template, source = meta["tokenizer.chat_template"], "gguf"
        else:
            template, source = prompts.TEMPLATES["alpaca"], "default"
        stop = []
        for name, text in prompts.TEMPLATES.items():
            if text == template:
                stop = list(prompts.STOPS[name])
        bos = self._token_text(self.bos_id)
        eos = self._token_text(self.eos_id)
        return ModelInfo(
            id=self.config.model_id, path=str(self.config.model_path), n_ctx=self.n_ctx,
            n_ctx_train=llm._model.n_ctx_train(), n_vocab=self.n_vocab, n_embd=llm.n_embd(),
            chat_template=template, chat_template_source=source, bos_token=bos, eos_token=eos,
            add_bos=self.add_bos, stop=stop, created=int(os.path.getmtime(self.config.model_path)),
            metadata={k: v for k, v in meta.items() if k != "tokenizer.chat_template"},
        )

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._lc.llama_vocab_get_text(self._vocab, token_id).decode("utf-8", errors="replace")

    def _piece(self, token_id: int, special: bool = False) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lc.llama_token_to_piece(self._vocab, token_id, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    # -- tokenizer -------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos and self.add_bos,
                                       special=special))

    def check_tokens(self, token_ids: Sequence[int], param: str = "prompt") -> None:
        for t in token_ids:
            if not (0 <= t < self.n_vocab):
                raise InvalidRequest(f"token id {t} is out of range: the model's vocabulary has "
                                     f"{self.n_vocab} tokens (ids 0..{self.n_vocab - 1})", param=param)

    def token_piece(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        self.check_tokens(token_ids, "tokens")
        return b"".join(self._pieces[t] for t in token_ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the chat template and tokenize; BOS comes from the template.

        Templates that include ``bos_token`` (the Alpaca ones do) put the BOS text in the prompt,
        which tokenizes to the BOS id with special-token parsing; a template that does not gets one
        BOS prepended when the model adds BOS. Never two.
        """
        from jinja2 import TemplateError

        from cllama_deploy import prompts

        try:
            text = prompts.render_chat(self.info.chat_template, messages, bos_token=self.info.bos_token,
                                       eos_token=self.info.eos_token,
                                       add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template could not render these messages: {exc}",
                                 param="messages") from exc
        tokens = self.tokenize(text, add_bos=False, special=True)
        if self.add_bos and (not tokens or tokens[0] != self.bos_id):
            tokens.insert(0, self.bos_id)
        return tokens

    # -- generation ------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise before queueing if the request can never run."""
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
                n_ctx=self.n_ctx, prompt_tokens=n_prompt, requested=p.max_tokens)
        for t in p.logit_bias:
            if not (0 <= t < self.n_vocab):
                raise InvalidRequest(f"logit_bias names token {t}, outside the vocabulary "
                                     f"(0..{self.n_vocab - 1})", param="logit_bias")
        if p.grammar is not None:
            g = self._grammar_sampler(p.grammar)
            self._lc.llama_sampler_free(g)

    def _grammar_sampler(self, grammar: str):
        g = self._lc.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not g:
            raise InvalidRequest("the response_format could not be turned into a valid llama.cpp "
                                 "grammar", param="response_format")
        return g

    def generate(self, request: GenerationRequest) -> EventStream:
        if self._closed:
            from cllama_deploy.engine.base import EngineClosed

            raise EngineClosed("the server is shutting down")
        self.validate(request)
        stream = EventStream(asyncio.get_running_loop(), request.deadline)
        job = Job(run=lambda: self._run_generation(request, stream), stream=stream)
        self.scheduler.submit(job)
        return stream

    def _make_sampler(self, p: SamplingParams):
        from llama_cpp._internals import LlamaSampler

        s = LlamaSampler()
        if p.logit_bias:
            s.add_logit_bias(self.n_vocab, {int(k): float(v) for k, v in p.logit_bias.items()})
        if p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            s.add_penalties(n_vocab=self.n_vocab, penalty_last_n=p.penalty_last_n,
                            penalty_repeat=p.repeat_penalty, penalty_freq=p.frequency_penalty,
                            penalty_present=p.presence_penalty)
        if p.grammar is not None:
            # before any truncation, so the grammar always sees (and keeps) every allowed token
            self._lc.llama_sampler_chain_add(s.sampler, self._grammar_sampler(p.grammar))
        if p.temperature <= 0.0:
            s.add_greedy()
        else:
            if p.top_k > 0:
                s.add_top_k(p.top_k)
            if p.typical_p < 1.0:
                s.add_typical(p.typical_p, 1)
            if p.top_p < 1.0:
                s.add_top_p(p.top_p, 1)
            if p.min_p > 0.0:
                s.add_min_p(p.min_p, 1)
            s.add_temp(p.temperature)
            seed = random.getrandbits(32) if p.seed is None else p.seed % 0xFFFFFFFF
            s.add_dist(seed)
        return s

    def _prefill(self, prompt: list[int], stream: EventStream) -> bool:
        """Bring the KV cache to ``prompt`` reusing the longest cached prefix; False if cancelled."""
        llm = self._llm
        cached = llm.n_tokens
        limit = min(cached, len(prompt) - 1)  # re-decode at least the last token for fresh logits
        common = 0
        if limit > 0:
            same = np.asarray(llm.input_ids[:limit]) == np.asarray(prompt[:limit])
            common = limit if same.all() else int(np.argmin(same))
        if common > 0 and not llm._ctx.kv_cache_seq_rm(-1, common, -1):
            common = 0
        if common == 0:
            llm._ctx.kv_cache_clear()
        llm.n_tokens = common
        rest = prompt[common:]
        step = max(1, llm.n_batch)
        for i in range(0, len(rest), step):
            if stream.cancelled.is_set():
                return False
            llm.eval(rest[i:i + step])
        return True

    def _decode_next(self, token: int, stream: EventStream, chunk: Optional[Chunk]) -> None:
        """Decode one generated token, handing ``chunk`` to the event loop just before.

        The hand-off wakes the event-loop thread, which then needs the GIL. Doing it right before the
        long, GIL-free ``llama_decode`` call (instead of before ``Llama.eval``'s own bookkeeping, which
        makes short GIL-releasing calls) lets the loop do its work while we decode, rather than making
        this thread wait for the GIL mid-step: that wait cost ~10% of the tokens/s on a busy 2-core
        machine. Same effect as ``Llama.eval([token])``.
        """
        llm = self._llm
        n_past = llm.n_tokens
        if n_past >= llm._n_ctx:
            raise EngineError("the context window is full")
        llm._batch.set_batch(batch=[token], n_past=n_past, logits_all=False)
        if chunk is not None:
            stream.put(chunk)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past] = token
        llm.n_tokens = n_past + 1

    def _logprob(self, token: int, k: int) -> TokenLogprob:
        ptr = self._lc.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        top: list[TopLogprob] = []
        if k > 0:
            k = min(k, self.n_vocab)
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            top = [TopLogprob(int(i), self._pieces[int(i)], float(logits[i] - lse)) for i in idx]
        return TokenLogprob(token, self._pieces[token], float(logits[token] - lse), top)

    def _run_generation(self, request: GenerationRequest, stream: EventStream) -> None:
        """The token loop (worker thread). Always ends the stream: a final chunk, or an exception."""
        if stream.cancelled.is_set():
            stream.close()
            return
        p = request.params
        prompt = request.prompt_tokens
        n_prompt = len(prompt)
        t_submit = time.monotonic()
        if request.deadline is not None and t_submit > request.deadline:
            stream.put(RequestTimeout("the request waited in the queue past the per-request timeout"))
            return
        sampler = None
        try:
            sampler = self._make_sampler(p)
            if not self._prefill(prompt, stream):
                self._cancelled += 1
                stream.close()
                return
            assembler = TextAssembler(p.stop)
            held_ids: list[int] = []
            held_lp: list[TokenLogprob] = []
            want_lp = p.logprobs is not None
            n_out = 0
            finish = None
            final_text = None
            t_first = None
            ctx = self._llm._ctx
            limit = self.n_ctx - n_prompt
            if p.max_tokens is not None:
                limit = min(limit, p.max_tokens)
            while True:
                if stream.cancelled.is_set():
                    self._cancelled += 1
                    stream.close()
                    return
                if request.deadline is not None and time.monotonic() > request.deadline:
                    raise RequestTimeout("generation ran past the per-request timeout")
                token = sampler.sample(ctx, -1)
                if t_first is None:
                    t_first = time.monotonic()
                if token < 0 or token >= self.n_vocab or self._eog[token]:
                    finish = "stop"
                    break
                n_out += 1
                held_ids.append(token)
                if want_lp:
                    held_lp.append(self._logprob(token, p.logprobs or 0))
                text = assembler.push(self._pieces[token])
                if assembler.stopped:
                    finish, final_text = "stop", text
                    break
                chunk = None
                if text:
                    chunk = Chunk(text, held_ids, held_lp if want_lp else None)
                    held_ids, held_lp = [], []
                if n_out >= limit:
                    if chunk is not None:
                        stream.put(chunk)
                    finish = "length"
                    break
                self._decode_next(token, stream, chunk)
            if final_text is None:
                final_text = assembler.finish()
            t_end = time.monotonic()
            decode_s = t_end - (t_first or t_end)
            stream.put(Chunk(
                final_text,
                held_ids, held_lp if want_lp else None, finish_reason=finish,
                usage=Usage(n_prompt, n_out),
                time_to_first_token=(t_first or t_end) - stream.submitted,
                tokens_per_second=(n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else None,
            ))
            stream.close()
        except RequestTimeout as exc:
            stream.put(exc)
        except Exception as exc:
            log.exception("generation failed")
            # the KV cache state is unknown now: start clean next time
            self._llm.n_tokens = 0
            stream.put(EngineError(f"generation failed inside llama.cpp: {exc}"))
        finally:
            if sampler is not None:
                sampler.close()

    # -- embeddings ------------------------------------------------------------------------------
    def _embedding_llm(self):
        with self._embed_lock:
            if self._embed_llm is None:
                import llama_cpp

                n = self.n_ctx
                self._embed_llm = llama_cpp.Llama(
                    model_path=str(self.config.model_path), n_ctx=n, n_batch=n, n_ubatch=n,
                    n_threads=self.n_threads, n_threads_batch=self.n_threads, embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False,
                )
            return self._embed_llm

    def _embed_one(self, tokens: list[int]) -> list[float]:
        emb = self._embedding_llm()
        emb._ctx.kv_cache_clear()
        emb._batch.reset()
        emb._batch.add_sequence(tokens, 0, True)
        emb._ctx.decode(emb._batch)
        ptr = self._lc.llama_get_embeddings_seq(emb._ctx.ctx, 0)
        vec = np.ctypeslib.as_array(ptr, shape=(emb.n_embd(),)).astype(np.float64)
        norm = np.linalg.norm(vec)
        if norm > 0:
            vec = vec / norm
        return vec.astype(np.float32).tolist()

    async def embed(self, inputs: list[list[int]], *, deadline: float | None = None) -> Embeddings:
        if not self.config.embeddings:
            raise InvalidRequest("embeddings are disabled for this model (`embeddings: false` in the settings file)",
                                 param="model")
        for i, toks in enumerate(inputs):
            if not toks:
                raise InvalidRequest(f"input[{i}] is empty (no tokens)", param="input")
            self.check_tokens(toks, "input")
            if len(toks) > self.n_ctx:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.n_ctx} tokens, but input[{i}] has "
                    f"{len(toks)} tokens. Shorten the input.", n_ctx=self.n_ctx, prompt_tokens=len(toks))
        stream = EventStream(asyncio.get_running_loop(), deadline)

        def run() -> None:
            try:
                vectors = []
                for toks in inputs:
                    if stream.cancelled.is_set():
                        stream.close()
                        return
                    vectors.append(self._embed_one(toks))
                stream.put(Embeddings(vectors, sum(len(t) for t in inputs)))
                stream.close()
            except Exception as exc:
                log.exception("embedding failed")
                stream.put(EngineError(f"embedding failed inside llama.cpp: {exc}"))

        self.scheduler.submit(Job(run=run, stream=stream, kind="embed"))
        result = None
        async for item in stream:
            result = item
        if result is None:
            raise EngineError("embedding was cancelled")
        return result

    # -- state -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"queue_depth": self.scheduler.queue_depth, "running": self.scheduler.running,
                "cancelled": self._cancelled}

    def close(self, timeout: float | None = None) -> None:
        self._closed = True
        self.scheduler.close(timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close, 30.0)
