"""Health, Prometheus metrics and the web chat page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from cllama_deploy.engine.registry import RegistryState
from cllama_deploy.server.metrics import CONTENT_TYPE

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


@router.get("/health", tags=["System"],
            summary="200 when the models are loaded; 503 (Retry-After) while loading; 500 if loading failed")
async def health(request: Request):
    """``{"status": "ok", "models": [...], "slots": {model: {used, total, queue_depth}}}`` when ready.

    ``loading`` is a 503 with ``Retry-After`` (it will become ready). ``failed`` is a 500 without it:
    the models will not load until the operator fixes them (``cllama-deploy serve`` itself exits with
    code 2 when a model fails to load at start-up; an application that builds the app with loaders
    keeps serving this answer).
    """
    registry = request.app.state.registry
    if registry.state is RegistryState.READY:
        slots = {}
        for engine in registry.engines():
            stats = engine.stats()
            slots[engine.info.id] = {"used": stats.get("slots_used", stats.get("running", 0)),
                                     "total": stats.get("slots_total"),
                                     "queue_depth": stats.get("queue_depth", 0)}
        return {"status": "ok", "models": registry.ids(), "slots": slots}
    body = {"status": registry.state.value}
    if registry.error:
        body["error"] = registry.error
    if registry.state is RegistryState.FAILED:
        return JSONResponse(body, status_code=500)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", tags=["System"], summary="Prometheus metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})
