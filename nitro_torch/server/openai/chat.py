"""POST /v1/chat/completions, plain and streaming."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nitro_torch.server.chat.preprocess import prepare_chat
from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.http.context import get_engine, parse_body, respond
from nitro_torch.server.model_names import check_model_name


async def chat_completions(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_body(request, ChatCompletionRequest)
    check_model_name(request, engine, body.model)
    prepared = await prepare_chat(request, engine, body)
    completion = prepared.completion(request, engine, include_usage=body.include_usage,
                                     continuous_usage=body.continuous_usage)
    return await respond(request, completion, bool(body.stream))


routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
