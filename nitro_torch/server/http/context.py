"""What every route needs from the request: the serving engine, a parsed JSON body, disconnect handling."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.http.errors import APIError, invalid_json_error, validation_error
from nitro_torch.server.http.sse import SSEResponse
from nitro_torch.server.model_host import lease_holder

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

logger = logging.getLogger("nitro_torch.server")

_T = TypeVar("_T")
_Body = TypeVar("_Body", bound=BaseModel)


class ClientDisconnected(Exception):
    pass


def get_engine(request: Request) -> EngineClient:
    """The engine serving this request, leased from the app's ModelHost until the response is fully sent
    (so a model switch waits for it). The same engine for every call within one request.

    503 `model_not_loaded` while no model is loaded, 503 `model_switching` (+ Retry-After) during a switch.
    """
    holder = lease_holder(request)
    if holder is not None and holder.lease is not None:
        return holder.lease.engine
    host = getattr(request.app.state, "host", None)
    if host is None:  # an app built without a ModelHost
        engine = getattr(request.app.state, "engine", None)
        if engine is None:
            raise APIError(503, "No model is loaded.", code="model_not_loaded")
        return engine
    lease = host.acquire()
    if holder is None:  # no LeaseMiddleware to release it later: do not count this request
        lease.release()
    else:
        holder.lease = lease
    return lease.engine


MAX_JSON_DEPTH = 128
"""Deeper bodies are a 400: the recursive code behind the parser (pydantic, chat templates, grammars) would
otherwise run out of stack on them and answer 500."""
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""json.loads joins escaped surrogate pairs, so what is left is unpaired: not Unicode, and the tokenizer fails on it."""


def _malformed(data: Any) -> APIError | None:
    """Why `data` (a parsed body) is unusable though it is JSON, walking it without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return APIError(400, "The request body has a string with an unpaired UTF-16 surrogate escape "
                                     "(\\ud800-\\udfff); strings must be valid Unicode.", code="invalid_json")
            continue
        if isinstance(value, dict):
            children: list[Any] = [*value, *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return _nested_too_deeply()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (str, dict, list)))
    return None


def _nested_too_deeply() -> APIError:
    return APIError(400, f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
                    code="invalid_json")


async def read_json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid_json_error(exc) from None
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not valid UTF-8.", code="invalid_json") from None
    except RecursionError:  # json's C scanner: thousands of levels
        raise _nested_too_deeply() from None
    error = _malformed(data)
    if error is not None:
        raise error
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


def check_token_list(ids: list[int], vocab_size: int, param: str, what: str) -> None:
    """400 unless `ids` (the token ids of one prompt or input, named `what` in the message) are in the vocabulary."""
    if not ids:
        raise APIError(400, f"{what} is empty; it needs at least one token.", param=param, code="invalid_value")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{what} has token id {bad}, but the vocabulary has {vocab_size} tokens.",
                       param=param, code="invalid_value")


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    for param, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        unknown = [t for t in ids if t >= vocab_size]
        if unknown:
            raise SamplingParamsError(param, f"'{param}' names token id {unknown[0]}, but the vocabulary has "
                                             f"{vocab_size} tokens")


class Generation(Protocol):
    id: str

    def stream(self) -> AsyncIterator[bytes]: ...

    async def collect(self) -> BaseModel: ...


async def respond(request: Request, generation: Generation, stream: bool) -> Response:
    """SSE when `stream`, else the whole answer; a client that leaves early aborts the generation."""
    if stream:
        return SSEResponse(generation.stream(), getattr(generation, "shutdown_events", None))
    try:
        result = await until_disconnect(request, generation.collect())
    except ClientDisconnected:
        logger.info("client disconnected; aborted %s", generation.id)
        return Response(status_code=499)
    return JSONResponse(result.model_dump())
