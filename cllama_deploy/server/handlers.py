"""The HTTP side of the OpenAI routes: pick the engine, hand the parsed body to the request layer
(``engine/requests.py``, which decides what the request means), and send its typed results back as
JSON or server-sent events.

Every stream we send ends with a chunk carrying ``finish_reason`` (or an error event) followed by
``data: [DONE]``; a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cllama_deploy.engine import requests as rl
from cllama_deploy.engine.base import Engine
from cllama_deploy.server.errors import to_api_error
from cllama_deploy.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    pass


def request_config(request: Request, engine: Engine) -> rl.RequestConfig:
    """The request layer's policy for ``engine`` (built once per model from the settings)."""
    configs = request.app.state.request_configs
    config = configs.get(engine.info.id)
    if config is None:
        config = configs[engine.info.id] = request.app.state.settings.request_config(engine.info.id)
    return config


def _open(request: Request, body) -> Engine:
    """The engine ``body.model`` names; tags the request for the access log."""
    engine = request.app.state.registry.get(body.model)
    request.state.model = engine.info.id
    request.state.stream = bool(getattr(body, "stream", False))
    request.state.user = body.user
    return engine


async def until_disconnect(request: Request, coro, run: rl.Run) -> Any:
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
        run.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    run.cancel()
    raise ClientDisconnected()


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


async def _respond(request: Request, engine: Engine, prep: rl.Prepared) -> Response:
    """Submit a prepared chat or text completion; answer with an SSE stream or one JSON object."""
    metrics = request.app.state.metrics
    model = engine.info.id
    run = rl.submit(engine, prep, on_final=lambda final: metrics.observe_generation(model, final))
    if prep.stream:
        return SSEResponse(_drive_sse(request, run))
    rstate = request.state
    try:
        result = await until_disconnect(request, run.result(), run)
    except ClientDisconnected:
        rstate.disconnected = True
        return Response(status_code=499)
    finally:
        _log_fields(request, run)
    return JSONResponse(result.model_dump(mode="json"))


def _log_fields(request: Request, run: rl.Run) -> None:
    rstate = request.state
    rstate.prompt_tokens = run.prepared.prompt_tokens
    rstate.completion_tokens = run.completion_tokens
    rstate.finish_reason = run.finish_reason


async def _drive_sse(request: Request, run: rl.Run) -> AsyncIterator[str]:
    """The SSE body: the run's chunks, then ``[DONE]``; a failure becomes an error event.

    ``usage`` is a key of every chunk only with ``stream_options.include_usage`` (``null`` until the
    last chunk), as OpenAI sends it.
    """
    rstate = request.state
    exclude = None if run.prepared.include_usage else {"usage"}
    try:
        async for chunk in run.chunks():
            yield "data: " + chunk.model_dump_json(exclude=exclude) + "\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        rstate.disconnected = True
        raise
    except Exception as exc:
        err = to_api_error(exc)
        rstate.error = err.code or err.type
        request.app.state.metrics.stream_errors.labels(run.prepared.model).inc()
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
    finally:
        _log_fields(request, run)


async def chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
    engine = _open(request, body)
    return await _respond(request, engine, rl.prepare_chat(engine, body, request_config(request, engine)))


async def completion(request: Request, body: CompletionRequest) -> Response:
    engine = _open(request, body)
    return await _respond(request, engine,
                          rl.prepare_completion(engine, body, request_config(request, engine)))


async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
    engine = _open(request, body)
    result = await rl.create_embeddings(engine, body, request_config(request, engine))
    request.state.prompt_tokens = result.usage.prompt_tokens
    return JSONResponse(result.model_dump(mode="json"))
