"""POST /v1/messages (plain and streaming) and POST /v1/messages/count_tokens: Anthropic's Messages API on the
one chat pipeline (convert.py translates the request; chat/preprocess.py prepares it as for any chat).

Errors under these paths are Anthropic's error body (errors.py). The API key may come as `x-api-key`
(http/security.py); the `anthropic-version` and `anthropic-beta` headers are accepted and ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from nitro_torch.server.anthropic.convert import to_chat_request
from nitro_torch.server.anthropic.errors import PATH_PREFIX, renamed
from nitro_torch.server.anthropic.protocol import CountTokensRequest, CountTokensResponse, MessagesRequest
from nitro_torch.server.anthropic.stream import MessageGeneration
from nitro_torch.server.chat.preprocess import PreparedChat, prepare_translated_chat
from nitro_torch.server.http.context import get_engine, parse_body, respond
from nitro_torch.server.model_names import check_model_name

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient


async def _prepare(request: Request, engine: EngineClient, body: CountTokensRequest) -> PreparedChat:
    """The chat pipeline's preparation; its errors name the fields as the Anthropic request spells them."""
    check_model_name(request, engine, body.model)
    return await prepare_translated_chat(request, engine, to_chat_request(body), renamed)


async def create_message(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_body(request, MessagesRequest)
    prepared = await _prepare(request, engine, body)
    generation = MessageGeneration(prepared.completion(request, engine), body.stop_sequences or [])
    return await respond(request, generation, bool(body.stream))


async def count_tokens(request: Request) -> Response:
    """The prompt /v1/messages would run for the same body, counted (nothing is generated)."""
    engine = get_engine(request)
    body = await parse_body(request, CountTokensRequest)
    prepared = await _prepare(request, engine, body)
    return JSONResponse(CountTokensResponse(input_tokens=len(prepared.prompt_ids)).model_dump())


routes: list[BaseRoute] = [
    Route(PATH_PREFIX, create_message, methods=["POST"]),
    Route(f"{PATH_PREFIX}/count_tokens", count_tokens, methods=["POST"]),
]
