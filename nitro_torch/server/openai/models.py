"""GET /v1/models and /v1/models/{id}: the served model, or an empty list while none is loaded."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nitro_torch.server.chat.protocol import ModelCard, ModelList
from nitro_torch.server.http.context import get_engine
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.model_host import get_host
from nitro_torch.server.model_names import known_names


async def list_models(request: Request) -> JSONResponse:
    """Nitro's clients poll this while no model is loaded: an empty list then, not 503."""
    if get_host(request).engine is None:
        return JSONResponse(ModelList(data=[]).model_dump())
    return JSONResponse(ModelList(data=[_model_card(request)]).model_dump())


async def retrieve_model(request: Request) -> JSONResponse:
    """The served model under any of its names (--served-model-name aliases, --model)."""
    card = _model_card(request)
    model_id = request.path_params["model_id"]
    if model_id not in known_names(get_engine(request)):
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return JSONResponse(card.model_copy(update={"id": model_id}).model_dump())


def _model_card(request: Request) -> ModelCard:
    engine = get_engine(request)
    created = getattr(request.app.state, "started_at", None) or int(time.time())
    return ModelCard(id=engine.model_name, created=created, max_model_len=engine.max_model_len)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
]
