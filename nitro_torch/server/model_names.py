"""Which `model` names a request may send: the served model answers any name unless --strict-model-name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from nitro_torch.config import served_names
from nitro_torch.server.http.errors import APIError

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient


def known_names(engine: EngineClient) -> list[str]:
    """The served name first, then the other --served-model-name aliases and the --model value."""
    names = [engine.model_name, *served_names(engine.config.model.served_model_name), engine.config.model.model]
    return list(dict.fromkeys(names))


def check_model_name(request: Request, engine: EngineClient, requested: str | None) -> None:
    """`model` may be empty (Nitro clients send ""), name the served model, or, as Nitro and llama.cpp answer,
    any other name: one model is served, and clients copied from elsewhere send `gpt-4o-mini`. The answer
    names the served model. With --strict-model-name an unknown name is 404 (except for a model loaded
    through Nitro's loadmodel, whose clients name models their own way)."""
    if not requested or requested in known_names(engine):
        return
    config = request.app.state.config
    host = getattr(request.app.state, "host", None)
    if host is not None and host.serving is not None and host.serving.any_model_name:
        return
    if config.server.strict_model_name:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves '{engine.model_name}'.",
                       type="invalid_request_error", param="model", code="model_not_found")
