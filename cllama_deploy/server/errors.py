"""The one place that builds OpenAI error objects: ``{"error": {message, type, param, code}}``.

Every failure a client can trigger maps to a status and an error object here: validation problems are
400 (never FastAPI's 422 body) and every 400 has a ``code``, unknown routes 404, unknown models 404, a
prompt longer than the context 400 ``context_length_exceeded``, API key problems 401, a full queue 429,
loading or shutting down 503, models that failed to load 500 ``model_load_failed`` (no Retry-After:
retrying does not help), the per-request timeout 504. Anything unexpected is a 500 with a generic
message (and a logged traceback), never a dropped connection.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cllama_deploy.engine.base import (
    ContextLengthExceeded,
    EngineClosed,
    EngineError,
    InvalidRequest,
    QueueFull,
    RequestTimeout,
)
from cllama_deploy.engine.registry import ModelLoadFailed, ModelNotFound, ModelNotReady
from cllama_deploy.engine.requests import describe_validation_errors

log = logging.getLogger("cllama_deploy.server")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def to_api_error(exc: BaseException, param: Optional[str] = None) -> APIError:
    """Map an engine/registry exception to its HTTP status and OpenAI fields."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param=getattr(exc, "param", None) or param or "messages",
                        code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param or param,
                        code=getattr(exc, "code", None) or "invalid_value")
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelLoadFailed):
        return APIError(500, str(exc), type="server_error", code="model_load_failed")
    if isinstance(exc, ModelNotReady):
        return APIError(503, str(exc), type="service_unavailable", code="model_loading",
                        headers={"Retry-After": "5"})
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), type="timeout", code="timeout")
    if isinstance(exc, EngineClosed):
        return APIError(503, str(exc), type="service_unavailable", code="shutting_down")
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "The server had an error while processing your request.",
                    type="server_error", code="internal_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = describe_validation_errors(exc.errors())
        return error_response(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"Unknown request URL: {request.method} {request.url.path}.",
                           code="unknown_url")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed for {request.url.path}.",
                           code="method_not_allowed")
        elif exc.status_code == 413:
            err = APIError(413, str(exc.detail), code="request_too_large")
        else:
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            err = APIError(exc.status_code, detail,
                           code="invalid_request" if exc.status_code == 400 else f"http_{exc.status_code}")
        resp = error_response(err)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc)

    for cls in (ContextLengthExceeded, InvalidRequest, ModelNotFound, ModelNotReady, ModelLoadFailed,
                QueueFull, RequestTimeout, EngineClosed, EngineError):
        app.add_exception_handler(cls, _engine_handler)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(to_api_error(exc))


async def _engine_handler(request: Request, exc: Exception):
    return error_response(to_api_error(exc))
