"""What the OpenAI routes do: request → engine requests, engine chunks → OpenAI responses and SSE.

Routes stay thin and call these. Every stream we send ends with a chunk carrying ``finish_reason`` (or
an error event) followed by ``data: [DONE]``; a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Union

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cllama_deploy import __version__
from cllama_deploy.engine.base import (
    Chunk,
    Engine,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from cllama_deploy.server.errors import APIError, to_api_error
from cllama_deploy.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponseFormat,
)

FINGERPRINT = f"cllama-deploy-{__version__}"
MAX_SCHEMA_REPEAT = 1000
MAX_SCHEMA_DEPTH = 32
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: Any = None
    final: Optional[Chunk] = None


class ClientDisconnected(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Request → engine
# ---------------------------------------------------------------------------------------------


def sampling_params(body, defaults: dict[str, Any], *, max_tokens: Optional[int], stop: list[str],
                    logprobs: Optional[int], grammar: Optional[str]) -> SamplingParams:
    base = SamplingParams(**defaults)
    values = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
                 "presence_penalty", "frequency_penalty", "seed"):
        v = getattr(body, name, None)
        if v is not None:
            values[name] = v
    bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    return dataclasses.replace(base, **values, max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                               logit_bias=bias, grammar=grammar)


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if s]


def grammar_for(fmt: Optional[ResponseFormat]) -> Optional[str]:
    """GBNF grammar text for ``response_format`` (None for plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if fmt.type == "json_object":
        return JSON_GBNF
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    if not isinstance(schema, dict):
        raise APIError(400, "response_format of type json_schema needs json_schema.schema (an "
                       "object)", param="response_format.json_schema")
    _check_schema(schema, 0)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise APIError(400, "the JSON schema is nested too deeply", param="response_format") from None
    except Exception as exc:  # the converter raises many types on schemas it does not support
        raise APIError(400, f"unsupported JSON schema: {type(exc).__name__}: {exc}"[:500],
                       param="response_format") from None


def _check_schema(node: Any, depth: int) -> None:
    """Reject schemas whose grammar would be huge (repetition counts) or too deep."""
    if depth > MAX_SCHEMA_DEPTH:
        raise APIError(400, f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels",
                       param="response_format")
    if isinstance(node, dict):
        for key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties",
                    "maxProperties"):
            v = node.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0
                                  or v > MAX_SCHEMA_REPEAT):
                raise APIError(400, f"JSON schema {key} must be an integer between 0 and "
                               f"{MAX_SCHEMA_REPEAT}", param="response_format")
        for v in node.values():
            _check_schema(v, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _check_schema(v, depth + 1)


def check_n(n: int, max_n: int) -> None:
    if n > max_n:
        raise APIError(400, f"n={n} is more than this server allows (max {max_n}); ask for fewer "
                       "choices", param="n", code="invalid_value")


def submit_all(engine: Engine, requests: list[GenerationRequest]) -> list:
    """Validate and enqueue every choice; on any failure cancel those already queued."""
    streams = []
    try:
        for r in requests:
            streams.append(engine.generate(r))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return streams


async def collect(streams, indexes: list[int]) -> list[ChoiceResult]:
    results = []
    for stream, index in zip(streams, indexes):
        res = ChoiceResult(index)
        parts = []
        async for chunk in stream:
            parts.append(chunk.text)
            res.token_ids.extend(chunk.token_ids)
            if chunk.logprobs:
                res.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason:
                res.finish_reason = chunk.finish_reason
                res.usage = chunk.usage
                res.final = chunk
        res.text = "".join(parts)
        results.append(res)
    return results


async def until_disconnect(request: Request, coro, streams) -> Any:
    """Await ``coro``; if the client disconnects first, cancel the generations."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        for s in streams:
            s.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    for s in streams:
        s.cancel()
    raise ClientDisconnected()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _open(request: Request, body) -> Engine:
    """The engine ``body.model`` names; tags the request for the access log."""
    engine = request.app.state.registry.get(body.model)
    request.state.model, request.state.stream, request.state.user = (
        engine.info.id, bool(body.stream), body.user)
    return engine


async def _gather(request: Request, engine: Engine, streams, indexes: list[int],
                  prompt_tokens: int) -> Optional[tuple[list[ChoiceResult], dict[str, int]]]:
    """Run a non-streaming request to the end: the choices and usage, or None if the client left.

    Records metrics and the access-log fields on the way.
    """
    rstate = request.state
    try:
        results = await until_disconnect(request, collect(streams, indexes), streams)
    except ClientDisconnected:
        rstate.disconnected = True
        return None
    metrics = request.app.state.metrics
    for r in results:
        if r.final is not None:
            metrics.observe_generation(engine.info.id, r.final)
    usage = _usage(prompt_tokens,
                   sum(r.usage.completion_tokens for r in results if r.usage is not None))
    rstate.prompt_tokens, rstate.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    rstate.finish_reason = results[0].finish_reason
    return results, usage


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client going away.

    Whatever Starlette version is installed, a disconnect cancels the body generator at once (even
    while it waits for a queued or slow generation), which cancels the engine work underneath.
    """

    def __init__(self, content, **kw):
        kw.setdefault("media_type", "text/event-stream")
        kw.setdefault("headers", SSE_HEADERS)
        super().__init__(content, **kw)

    async def __call__(self, scope, receive, send) -> None:
        import anyio

        async with anyio.create_task_group() as tg:
            async def body() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the socket went away mid-write
                    pass
                tg.cancel_scope.cancel()

            async def disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                tg.cancel_scope.cancel()

            tg.start_soon(body)
            tg.start_soon(disconnect)
        if self.background is not None:
            await self.background()


def _sse(data: Any) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


_Format = Union["_ChatFormat", "_CompletionFormat"]  # how an endpoint words its stream chunks


async def _respond(request: Request, engine: Engine, streams, indexes: list[int], fmt: _Format,
                   rid: str, prompt_tokens: int, body) -> Response:
    """The response to a submitted chat or text completion: an SSE stream or one JSON object.

    ``fmt`` words the endpoint's choices and chunks; the rest is the same for both endpoints.
    """
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_drive_sse(request, engine, streams, indexes, fmt, rid, created,
                                      prompt_tokens, include_usage))
    gathered = await _gather(request, engine, streams, indexes, prompt_tokens)
    if gathered is None:
        return Response(status_code=499)
    results, usage = gathered
    return JSONResponse({
        "id": rid, "object": fmt.object, "created": created, "model": engine.info.id,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": r.index, **fmt.choice(k, r), "finish_reason": r.finish_reason}
                    for k, r in enumerate(results)],
        "usage": usage,
    })


async def _drive_sse(request: Request, engine: Engine, streams, indexes: list[int], fmt: _Format,
                     rid: str, created: int, prompt_tokens: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streaming request, one choice after another.

    ``fmt`` words each choice's chunks; this driver does the rest: metrics, the usage chunk, the
    error event, ``[DONE]``, the access-log fields, and cancelling the generations when the stream
    does not finish.
    """
    model = engine.info.id
    rstate = request.state
    metrics = request.app.state.metrics
    completion_tokens = 0

    def chunk(index: int, choice: dict, finish: Optional[str] = None) -> str:
        data = {"id": rid, "object": fmt.chunk_object, "created": created, "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": index, **choice, "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return _sse(data)

    finished = False
    try:
        for k, (stream, index) in enumerate(zip(streams, indexes)):
            for choice in fmt.opening(k):
                yield chunk(index, choice)
            final: Optional[Chunk] = None
            async for c in stream:
                if c.text or (fmt.want_lp and c.logprobs):
                    yield chunk(index, fmt.piece(c))
                if c.finish_reason:
                    final = c
            if final is None:  # cancelled underneath us: report it rather than end silently
                raise APIError(500, "generation ended without a result", type="server_error")
            metrics.observe_generation(model, final)
            completion_tokens += final.usage.completion_tokens
            rstate.finish_reason = final.finish_reason
            yield chunk(index, fmt.closing(), final.finish_reason)
        if include_usage:
            yield _sse({"id": rid, "object": fmt.chunk_object, "created": created, "model": model,
                        "system_fingerprint": FINGERPRINT, "choices": [],
                        "usage": _usage(prompt_tokens, completion_tokens)})
        finished = True
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        rstate.disconnected = True
        raise
    except Exception as exc:
        err = to_api_error(exc)
        rstate.error = err.code or err.type
        metrics.stream_errors.labels(model).inc()
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
    finally:
        rstate.prompt_tokens, rstate.completion_tokens = prompt_tokens, completion_tokens
        if not finished:
            for s in streams:
                s.cancel()


# ---------------------------------------------------------------------------------------------
# Logprob formats
# ---------------------------------------------------------------------------------------------


def _tok_str(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": _tok_str(lp.token), "logprob": lp.logprob, "bytes": list(lp.token),
         "top_logprobs": [{"token": _tok_str(t.token), "logprob": t.logprob, "bytes": list(t.token)}
                          for t in lp.top]}
        for lp in items
    ], "refusal": None}


def completion_logprobs(items: list[TokenLogprob], offset: int, with_top: bool) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in items:
        s = _tok_str(lp.token)
        tokens.append(s)
        lps.append(lp.logprob)
        offsets.append(pos)
        pos += len(lp.token.decode("utf-8", errors="ignore"))
        if with_top:
            tops.append({_tok_str(t.token): t.logprob for t in lp.top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if with_top else None,
            "text_offset": offsets}


# ---------------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------------


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise APIError(400, str(exc), param=f"messages.{i}.content") from None
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    return out


async def chat_completion(request: Request, body: ChatCompletionRequest):
    settings = request.app.state.settings
    engine = _open(request, body)
    if body.tools or body.functions:
        raise APIError(400, "tools and functions are not supported by this server", param="tools")
    n = body.n or 1
    check_n(n, settings.max_n)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    prompt = engine.render_chat(chat_messages(body))
    stops = stop_list(body.stop) + list(engine.info.stop)
    params = sampling_params(body, settings.sampling, max_tokens=max_tokens, stop=stops,
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                             grammar=grammar_for(body.response_format))
    deadline = time.monotonic() + settings.request_timeout
    rid = "chatcmpl-" + uuid.uuid4().hex
    reqs = [GenerationRequest(prompt, _seeded(params, i), rid, deadline) for i in range(n)]
    try:
        streams = submit_all(engine, reqs)
    except Exception as exc:
        raise to_api_error(exc, param="messages") from None
    return await _respond(request, engine, streams, list(range(n)), _ChatFormat(bool(body.logprobs)),
                          rid, len(prompt), body)


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + i)


@dataclass
class _ChatFormat:
    """How chat words a choice: a message; streamed, a role delta, content deltas, an empty delta."""

    want_lp: bool
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, k: int, r: ChoiceResult) -> dict:
        return {"message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": chat_logprobs(r.logprobs) if self.want_lp else None}

    def opening(self, k: int) -> list[dict]:
        return [{"delta": {"role": "assistant", "content": ""}, "logprobs": None}]

    def piece(self, c: Chunk) -> dict:
        return {"delta": {"content": c.text},
                "logprobs": chat_logprobs(c.logprobs or []) if self.want_lp else None}

    def closing(self) -> dict:
        return {"delta": {}, "logprobs": None}


# ---------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------


def completion_prompts(engine: Engine, prompt, echo: bool) -> tuple[list[list[int]], list[str]]:
    """Token ids for each prompt, and its text (for ``echo``; empty otherwise)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    tokens, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            tokens.append(engine.tokenize(p, add_bos=True, special=True))
            texts.append(p)
        else:
            ids = list(p)
            tokens.append(ids)
            texts.append(engine.detokenize(ids) if echo else "")
    return tokens, texts


async def completion(request: Request, body: CompletionRequest):
    settings = request.app.state.settings
    engine = _open(request, body)
    n = body.n or 1
    check_n(n, settings.max_n)
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of is not supported (it must equal n)", param="best_of")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported (prompt log-probabilities "
                       "are not computed)", param="echo")
    try:
        prompts, texts = completion_prompts(engine, body.prompt, bool(body.echo))
    except Exception as exc:
        raise to_api_error(exc, param="prompt") from None
    if len(prompts) * n > settings.max_n * 8:
        raise APIError(400, "too many choices in one request (prompts × n)", param="n")
    params = sampling_params(body, settings.sampling, max_tokens=body.max_tokens,
                             stop=stop_list(body.stop), logprobs=body.logprobs,
                             grammar=grammar_for(body.response_format))
    deadline = time.monotonic() + settings.request_timeout
    rid = "cmpl-" + uuid.uuid4().hex
    reqs, indexes, echoes = [], [], []
    for pi, toks in enumerate(prompts):
        for j in range(n):
            reqs.append(GenerationRequest(toks, _seeded(params, j), rid, deadline))
            indexes.append(pi * n + j)
            echoes.append(texts[pi] if body.echo else "")
    try:
        streams = submit_all(engine, reqs)
    except Exception as exc:
        raise to_api_error(exc, param="prompt") from None
    fmt = _CompletionFormat(want_lp=body.logprobs is not None, with_top=bool(body.logprobs),
                            echoes=echoes)
    return await _respond(request, engine, streams, indexes, fmt, rid,
                          sum(len(t) for t in prompts), body)


@dataclass
class _CompletionFormat:
    """How text completion words a choice: its text after the echoed prompt (if any); streamed,
    the echo, text pieces, an empty text.

    Logprob ``text_offset`` counts from the start of the choice's text, echo included, so while
    streaming the formatter keeps the current choice's offset (choices stream one after another).
    """

    want_lp: bool
    with_top: bool
    echoes: list[str]
    offset: int = 0
    object = "text_completion"
    chunk_object = "text_completion"

    def choice(self, k: int, r: ChoiceResult) -> dict:
        echo = self.echoes[k]
        return {"text": echo + r.text,
                "logprobs": completion_logprobs(r.logprobs, len(echo), self.with_top)
                if self.want_lp else None}

    def opening(self, k: int) -> list[dict]:
        echo = self.echoes[k]
        self.offset = len(echo)
        return [{"text": echo, "logprobs": None}] if echo else []

    def piece(self, c: Chunk) -> dict:
        lp = (completion_logprobs(c.logprobs or [], self.offset, self.with_top) if self.want_lp
              else None)
        self.offset += len(c.text)
        return {"text": c.text, "logprobs": lp}

    def closing(self) -> dict:
        return {"text": "", "logprobs": None}


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


async def embeddings(request: Request, body: EmbeddingRequest):
    state = request.app.state
    engine = state.registry.get(body.model)
    request.state.model = engine.info.id
    if body.dimensions is not None and body.dimensions != engine.info.n_embd:
        raise APIError(400, f"this model's embeddings have {engine.info.n_embd} dimensions; "
                       "dimensions cannot be changed", param="dimensions")
    inp = body.input
    if isinstance(inp, str):
        inp = [inp]
    if inp and isinstance(inp[0], int):
        inp = [inp]
    tokens = []
    for item in inp:
        if isinstance(item, str):
            tokens.append(engine.tokenize(item, add_bos=True, special=False))
        else:
            tokens.append(list(item))
    deadline = time.monotonic() + state.settings.request_timeout
    try:
        result = await engine.embed(tokens, deadline=deadline)
    except Exception as exc:
        raise to_api_error(exc, param="input") from None
    data = []
    for i, vec in enumerate(result.vectors):
        if body.encoding_format == "base64":
            emb: Any = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
        else:
            emb = vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    request.state.prompt_tokens = result.prompt_tokens
    return JSONResponse({"object": "list", "data": data, "model": engine.info.id,
                         "usage": {"prompt_tokens": result.prompt_tokens,
                                   "total_tokens": result.prompt_tokens}})
