"""Health, Prometheus metrics and the web chat page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from cllama_deploy.server.metrics import CONTENT_TYPE

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


@router.get("/health", tags=["System"], summary="200 when the models are loaded, 503 before")
async def health(request: Request):
    registry = request.app.state.registry
    if registry.state == "ready":
        return {"status": "ok", "models": registry.ids()}
    body = {"status": registry.state}
    if registry.error:
        body["error"] = registry.error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", tags=["System"], summary="Prometheus metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})
