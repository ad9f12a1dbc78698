"""``create_app(settings, engine)``: the FastAPI application.

The engine (or several, in a :class:`~cllama_deploy.engine.registry.ModelRegistry`) lives on
``app.state``; nothing is global, so tests can run several apps in one process.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Callable, Iterable, Optional, Union

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cllama_deploy import __version__
from cllama_deploy.engine.base import Engine
from cllama_deploy.engine.registry import ModelRegistry, RegistryState
from cllama_deploy.server.errors import install_error_handlers
from cllama_deploy.server.metrics import Metrics
from cllama_deploy.server.middleware import OperabilityMiddleware
from cllama_deploy.server.settings import Settings

log = logging.getLogger("cllama_deploy.server")


def create_app(settings: Settings, engine: Union[Engine, ModelRegistry, Iterable[Engine], None] = None,
               *, loaders: Optional[list[Callable[[], Engine]]] = None,
               on_load_failure: Optional[Callable[[BaseException], None]] = None) -> FastAPI:
    """Build the app.

    Args:
        settings: server settings (API keys, limits, CORS, ...).
        engine: a loaded engine, several engines, or a :class:`ModelRegistry`. None with ``loaders``
            starts empty: the app answers 503 until the loaders (run in a thread at startup) finish.
        loaders: blocking callables returning engines, run when the app starts.
        on_load_failure: called (in the event loop) with the exception when a loader fails; without
            it the app stays up and answers 500 ``model_load_failed`` (``/health``: ``failed``).
    """
    if isinstance(engine, ModelRegistry):
        registry = engine
    elif engine is None:
        registry = ModelRegistry()
    elif hasattr(engine, "info"):
        registry = ModelRegistry([engine])
    else:
        registry = ModelRegistry(list(engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        task = asyncio.create_task(registry.load(loaders)) if loaders else None
        if task is not None and on_load_failure is not None:
            def _check(t: asyncio.Task) -> None:
                if not t.cancelled() and registry.state is RegistryState.FAILED:
                    on_load_failure(registry.exception)

            task.add_done_callback(_check)
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            # uvicorn has already let in-flight requests finish (graceful shutdown). Engines the app
            # loaded itself are closed here; engines passed in belong to the caller.
            if loaders:
                await registry.aclose()

    app = FastAPI(
        title="cllama-deploy",
        version=__version__,
        description="OpenAI-compatible API over llama.cpp. Errors are OpenAI error objects.",
        lifespan=lifespan,
        docs_url=None,  # served below from local Swagger UI assets: laptops may be offline
    )
    _mount_offline_docs(app)
    app.openapi = lambda: _openapi(app)
    app.state.settings = settings
    app.state.request_configs = {}  # model id -> RequestConfig (handlers.request_config)
    app.state.registry = registry
    app.state.metrics = Metrics(registry.engines)

    from cllama_deploy.server.routes import extras, openai, system

    app.include_router(openai.router)
    app.include_router(extras.router)
    app.include_router(system.router)
    app.mount("/static", StaticFiles(directory=str(system.WEB_DIR)), name="static")
    install_error_handlers(app)

    app.add_middleware(OperabilityMiddleware, api_keys=settings.api_keys,
                       max_body_bytes=settings.max_body_bytes, access_log_enabled=settings.access_log,
                       metrics=app.state.metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    return app


def _mount_offline_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI from the ``swagger-ui-bundle-v2`` package instead of a CDN."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="cllama-deploy API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the stream chunk models the SSE responses reference (FastAPI only
    registers the models of JSON responses), minus FastAPI's 422 responses: validation errors are
    400 OpenAI error objects here (``errors.py``)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        from cllama_deploy.server.protocol import STREAM_CHUNKS

        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        _, defs = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
