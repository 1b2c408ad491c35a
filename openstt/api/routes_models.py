"""OpenAI's model routes (``GET /v1/models``, ``GET /v1/models/{id}``) and runtime model management
(``POST``/``DELETE /v1/models/{id}``, with OPEN_STT_ENABLE_MODEL_MANAGEMENT; ``openstt.model_manager``).

Unknown models, a disabled manager and the like are raised as ``openstt.errors`` exceptions and
answered by the app's handler (``openstt.api.errors``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from openstt.api.state import app_state
from openstt.errors import ModelManagementDisabled

if TYPE_CHECKING:
    from openstt.model_manager import ModelManager

router = APIRouter()

OWNER = "open-stt-server"


def model_object(model_id: str, created: int, alias_of: str | None = None) -> dict:
    """OpenAI's model object; an alias also says which model answers it (``alias_of``)."""
    body = {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}
    return {**body, "alias_of": alias_of} if alias_of else body


def _manager(request: Request) -> ModelManager:
    """The runtime model management, or ``ModelManagementDisabled`` when this server does not allow it."""
    state = app_state(request.app)
    state.serving_registry()  # still loading: 503 first
    if state.model_manager is None or not state.model_manager.enabled:
        raise ModelManagementDisabled()
    return state.model_manager


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    registry = app_state(request.app).serving_registry()
    data = [model_object(name, registry.created(name)) for name in registry.names()]
    # configured aliases follow the models, each naming the model that answers it
    data += [model_object(alias, registry.created(target), target)
             for alias, target in registry.aliases.items() if target in registry]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    registry = app_state(request.app).serving_registry()
    name = registry.resolve(model_id)
    return JSONResponse(model_object(model_id, registry.created(name), registry.alias_target(model_id)))


@router.post("/v1/models/{model_id:path}")
async def load_model(model_id: str, request: Request) -> JSONResponse:
    """Load a model at runtime (OPEN_STT_ENABLE_MODEL_MANAGEMENT); idempotent."""
    manager = _manager(request)
    name = await manager.load(model_id)
    return JSONResponse(model_object(model_id, manager.registry.created(name)))


@router.delete("/v1/models/{model_id:path}")
async def unload_model(model_id: str, request: Request) -> JSONResponse:
    """Unload a model at runtime (OPEN_STT_ENABLE_MODEL_MANAGEMENT); never the default one."""
    await _manager(request).unload(model_id)
    return JSONResponse({"id": model_id, "object": "model", "deleted": True})
