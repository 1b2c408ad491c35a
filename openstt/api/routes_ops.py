"""Operations routes: ``/health`` (readiness, for load balancers and Kubernetes) and ``/ui`` (the
try-it page). Prometheus ``/metrics`` is BentoML's own endpoint, next to this app."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from openstt.api.routes_realtime import drain_sessions
from openstt.api.state import app_state

router = APIRouter()

READY_TTL_S = 2.0
READY_TIMEOUT_S = 2.0  # the sync `ready` API answers in milliseconds beside a busy compute thread

UI_PAGE = Path(__file__).resolve().parent.parent / "ui" / "index.html"


async def _models_ready(app: FastAPI) -> bool:
    """Whether the process holding the weights answers (always, when they are in-process). A yes
    holds for ``READY_TTL_S``: probes every few seconds cost one call, and a model service that
    died or restarts turns /health to 503 within that time."""
    state = app_state(app)
    if state.models_ready is None or time.monotonic() - state.models_ready_at < READY_TTL_S:
        return True
    try:
        ready = bool(await asyncio.wait_for(state.models_ready(), timeout=READY_TIMEOUT_S))
    except Exception:  # not up (yet, or any more): connection refused, timeout
        return False
    if ready:
        state.models_ready_at = time.monotonic()
    return ready


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = app_state(request.app)
    if state.draining:  # the load balancer takes this pod out while it finishes its work
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    ready = state.registry is not None and await _models_ready(request.app)
    body = {"status": "ok" if ready else "loading"}
    if state.model_replicas is not None and (replicas := state.model_replicas()) is not None:
        body["model_replicas"] = replicas
    return JSONResponse(body, status_code=200 if ready else 503)


async def drain(app: FastAPI) -> None:
    """On SIGTERM: take no new work (503 to retry elsewhere), let live sessions complete their
    committed turns and close with 1012; requests in flight finish (uvicorn waits for them)."""
    state = app_state(app)
    state.draining = True
    await drain_sessions(state.live_limits)


@router.get("/ui", include_in_schema=False)
async def try_it() -> HTMLResponse:
    # A plain page calling the public API with the key it asks for: open unless
    # OPEN_STT_PROTECT_METRICS_AND_UI (then ApiKeyMiddleware asks the browser for the key first).
    return HTMLResponse(UI_PAGE.read_text("utf-8"))
