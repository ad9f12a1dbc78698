"""Pure-ASGI middleware: request ids, API keys, body size limit, structured access log, metrics.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that streaming responses and client disconnects
pass straight through.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Iterable, Optional

from starlette.exceptions import HTTPException as StarletteHTTPException

from cllama_deploy.server.errors import APIError

access_log = logging.getLogger("cllama_deploy.access")

# Paths anyone may reach without an API key: the chat page and its assets (the page asks for the key),
# health checks, Prometheus scraping, and the API docs.
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")
PUBLIC_PATHS = {"/", "/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/favicon.ico",
                "/docs/oauth2-redirect"}


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a body without (or lying about) Content-Length grows too large.

    An HTTPException so that FastAPI's body parsing passes it through unchanged (it turns other
    exceptions into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than the server's limit of {limit} bytes "
                              "(--max-body-bytes).")


class OperabilityMiddleware:
    def __init__(self, app, *, api_keys: Iterable[str] = (), max_body_bytes: int = 4 << 20,
                 access_log_enabled: bool = True, metrics=None):
        self.app = app
        self.api_keys = [k.encode("utf-8") for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.access_log_enabled = access_log_enabled
        self.metrics = metrics

    def _authorized(self, headers: dict[bytes, bytes]) -> Optional[APIError]:
        if not self.api_keys:
            return None
        auth = headers.get(b"authorization", b"")
        token = b""
        if auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
        elif headers.get(b"x-api-key"):
            token = headers[b"x-api-key"].strip()
        if not token:
            return APIError(401, "You didn't provide an API key. Send it in an Authorization header "
                            "(Authorization: Bearer YOUR_KEY).", code="missing_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        # compare against every key, without early exit, in constant time per key
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(token, key)
        if not ok:
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        path = scope.get("path", "")
        status_holder = {"status": 0, "bytes": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id",
                                                                  request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body":
                status_holder["bytes"] += len(message.get("body", b""))
            await send(message)

        err: Optional[APIError] = None
        if scope.get("method") != "OPTIONS" and path not in PUBLIC_PATHS \
                and not path.startswith(PUBLIC_PREFIXES):
            err = self._authorized(headers)
        if err is None:
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    err = self._too_large()
        try:
            if err is not None:
                await self._send_error(err, send_wrapper)
            else:
                received = 0

                async def receive_limited():
                    nonlocal received
                    message = await receive()
                    if message["type"] == "http.request":
                        received += len(message.get("body", b""))
                        if received > self.max_body_bytes:
                            raise BodyTooLarge(self.max_body_bytes)
                    return message

                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except BodyTooLarge:
                    if status_holder["status"] == 0:
                        await self._send_error(self._too_large(), send_wrapper)
        finally:
            duration = time.perf_counter() - start
            state = scope.get("state", {})
            if self.metrics is not None:
                self.metrics.observe_request(state.get("endpoint") or _endpoint(path),
                                             status_holder["status"] or 500, duration)
            if self.access_log_enabled:
                record = {
                    "ts": round(time.time(), 3),
                    "request_id": request_id,
                    "client": _client(scope),
                    "method": scope.get("method"),
                    "path": path,
                    "status": status_holder["status"] or None,
                    "duration_ms": round(duration * 1000, 1),
                    "bytes_out": status_holder["bytes"],
                }
                for key in ("model", "stream", "prompt_tokens", "completion_tokens", "finish_reason",
                            "error", "user", "disconnected"):
                    if state.get(key) is not None:
                        record[key] = state[key]
                access_log.info(json.dumps(record, ensure_ascii=False))

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the server's limit of "
                        f"{self.max_body_bytes} bytes (--max-body-bytes).", code="request_too_large")

    @staticmethod
    async def _send_error(err: APIError, send) -> None:
        body = json.dumps(err.body()).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        for k, v in (err.headers or {}).items():
            headers.append((k.lower().encode("latin-1"), v.encode("latin-1")))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _client(scope) -> Optional[str]:
    client = scope.get("client")
    if not client:
        return None
    return f"{client[0]}:{client[1]}"


_KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize",
          "/detokenize", "/health", "/metrics")


def _endpoint(path: str) -> str:
    for known in _KNOWN:
        if path == known or path.startswith(known + "/"):
            return known
    if path == "/" or path.startswith("/static/"):
        return "/"
    return "other"
