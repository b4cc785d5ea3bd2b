"""OpenAI-compatible routes: /v1/chat/completions (plain and streaming) and /v1/models."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nitro_torch.engine.engine import check_context_length
from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.chat_template import prompt_token_ids
from nitro_torch.server.completion import Completion
from nitro_torch.server.context import ClientDisconnected, get_engine, parse_body, token_texts, until_disconnect
from nitro_torch.server.errors import APIError
from nitro_torch.server.protocol import ChatCompletionRequest, ModelCard, ModelList
from nitro_torch.server.streaming import SSEResponse

logger = logging.getLogger("nitro_torch.server")


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    for param, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        unknown = [t for t in ids if t >= vocab_size]
        if unknown:
            raise SamplingParamsError(param, f"'{param}' names token id {unknown[0]}, but the vocabulary has "
                                             f"{vocab_size} tokens")


async def chat_completions(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_body(request, ChatCompletionRequest)
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
