"""OpenAI-compatible routes: /v1/chat/completions (plain and streaming) and /v1/models."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from nitro_torch.engine.engine import check_context_length
from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.chat_template import prompt_token_ids
from nitro_torch.server.completion import Completion
from nitro_torch.server.errors import APIError, invalid_json_error, validation_error
from nitro_torch.server.logprobs import TokenTexts
from nitro_torch.server.protocol import ChatCompletionRequest, ModelCard, ModelList
from nitro_torch.server.streaming import SSEResponse

if TYPE_CHECKING:
    from nitro_torch.engine.async_engine import AsyncEngine

logger = logging.getLogger("nitro_torch.server")

_T = TypeVar("_T")


class ClientDisconnected(Exception):
    pass


def get_engine(request: Request) -> AsyncEngine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "The model is not loaded yet.", code="model_not_ready")
    return engine


def token_texts(request: Request, engine: AsyncEngine) -> TokenTexts:
    texts = getattr(request.app.state, "token_texts", None)
    if texts is None:
        texts = request.app.state.token_texts = TokenTexts(engine.tokenizer)
    return texts


async def parse_chat_request(request: Request) -> ChatCompletionRequest:
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
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    for param, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        unknown = [t for t in ids if t >= vocab_size]
        if unknown:
            raise SamplingParamsError(param, f"'{param}' names token id {unknown[0]}, but the vocabulary has "
                                             f"{vocab_size} tokens")


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """Runs `work`, cancelling it (which aborts its engine request) if the client disconnects first."""
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


async def chat_completions(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_chat_request(request)
    params = body.to_sampling_params()  # SamplingParamsError and ContextLengthExceeded become 400s in errors.py
    check_token_ids(params, len(engine.tokenizer))
    prompt_ids = prompt_token_ids(engine.tokenizer, body.messages)
    check_context_length(len(prompt_ids), params.max_tokens, engine.max_model_len)
    completion = Completion(engine, token_texts(request, engine), prompt_ids, params,
                            include_usage=body.include_usage)
    if body.stream:
        return SSEResponse(completion.stream())
    try:
        result = await until_disconnect(request, completion.collect())
    except ClientDisconnected:
        logger.info("client disconnected; aborted %s", completion.id)
        return Response(status_code=499)
    return JSONResponse(result.model_dump())


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=[_model_card(request)]).model_dump())


async def retrieve_model(request: Request) -> JSONResponse:
    card = _model_card(request)
    model_id = request.path_params["model_id"]
    if model_id != card.id:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return JSONResponse(card.model_dump())


def _model_card(request: Request) -> ModelCard:
    engine = get_engine(request)
    created = getattr(request.app.state, "started_at", None) or int(time.time())
    return ModelCard(id=engine.model_name, created=created, max_model_len=engine.max_model_len)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
]
