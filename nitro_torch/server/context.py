"""What every route needs from the request: the serving engine, a parsed JSON body, disconnect handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import Receive

from nitro_torch.server.errors import APIError, invalid_json_error, validation_error
from nitro_torch.server.logprobs import TokenTexts

if TYPE_CHECKING:
    from nitro_torch.engine.async_engine import AsyncEngine

_T = TypeVar("_T")
_Body = TypeVar("_Body", bound=BaseModel)


class ClientDisconnected(Exception):
    pass


def get_engine(request: Request) -> AsyncEngine:
    """The engine serving requests now; 503 while no model is loaded."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "The model is not loaded yet.", code="model_not_ready")
    return engine


def token_texts(request: Request, engine: AsyncEngine) -> TokenTexts:
    texts = getattr(request.app.state, "token_texts", None)
    if texts is None or texts.tokenizer is not engine.tokenizer:
        texts = request.app.state.token_texts = TokenTexts(engine.tokenizer)
    return texts


async def read_json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid_json_error(exc) from None
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not valid UTF-8.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.",
                       code="invalid_json")
    return data


async def parse_body(request: Request, schema: type[_Body]) -> _Body:
    """The JSON body validated against `schema`; 400 with `param` naming the bad field otherwise."""
    data = await read_json_object(request)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            try:
                await work_task
            except asyncio.CancelledError:
                pass
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()
