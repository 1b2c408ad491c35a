"""Operations routes: ``/health`` (readiness, for load balancers and Kubernetes) and ``/ui`` (the
try-it page). Prometheus ``/metrics`` is BentoML's own endpoint, next to this app."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from openstt.api.state import app_state

router = APIRouter()

UI_PAGE = Path(__file__).resolve().parent.parent / "ui" / "index.html"


async def _models_ready(app: FastAPI) -> bool:
    """Whether the process holding the weights answers (always, when they are in-process)."""
    state = app_state(app)
    if state.models_ready_cached or state.models_ready is None:
        return True
    try:
        ready = bool(await asyncio.wait_for(state.models_ready(), timeout=5))
    except Exception:  # not up yet: connection refused, timeout
        return False
    state.models_ready_cached = ready
    return ready


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    if app_state(request.app).registry is None or not await _models_ready(request.app):
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ui", include_in_schema=False)
async def try_it() -> HTMLResponse:
    # A plain page calling the public API; it asks for the key itself, so it is served openly.
    return HTMLResponse(UI_PAGE.read_text("utf-8"))
