"""OpenAI's Responses API: POST /v1/responses (plain and streaming), GET and DELETE /v1/responses/{id}.

A request is translated into a ChatCompletionRequest and runs through the chat path (prepare_chat); the engine's
output is rendered as Responses items (responses_stream.py). Stored responses live in responses_store.py.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from nitro_torch.server.chat.preprocess import prepare_translated_chat
from nitro_torch.server.http.context import get_engine, parse_body, respond
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.model_names import check_model_name
from nitro_torch.server.openai.responses_protocol import (
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    echoed_fields,
    invalid,
)
from nitro_torch.server.openai.responses_store import ResponseStore, StoredResponse, store_of
from nitro_torch.server.openai.responses_stream import ResponseRun

CHAT_NAMES = (("response_format.json_schema", "text.format"), ("response_format", "text.format"),
              ("messages", "input"), ("max_tokens", "max_output_tokens"), ("logprobs", "include"))
"""Chat request fields in the chat path's errors, and the Responses fields they came from (longest first)."""


def _renamed(error: APIError) -> APIError:
    """`error` of the chat path, naming the Responses fields."""
    param, message = error.param, error.message
    for chat_name, name in CHAT_NAMES:
        if param is not None and (param == chat_name or param.startswith(chat_name + ".")):
            param = name + param[len(chat_name):]
        message = message.replace(f"'{chat_name}", f"'{name}").replace(f"x {chat_name}", f"x {name}")
    return APIError(error.status, message, type=error.type, param=param, code=error.code, headers=error.headers)


def _keeps(body: ResponsesRequest, store: ResponseStore) -> bool:
    """OpenAI stores by default; with no store kept (--responses-store 0) only an explicit `store: true` is a 400."""
    if store.capacity <= 0:
        if body.store:
            raise invalid("store", "This server keeps no responses (--responses-store 0), so 'store' cannot be "
                                   "true.", code="unsupported_parameter")
        return False
    return body.store is not False


def _previous(body: ResponsesRequest, store: ResponseStore) -> tuple[dict[str, Any], ...]:
    if body.previous_response_id is None:
        return ()
    stored = store.get(body.previous_response_id)
    if stored is None:
        raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found. This server keeps "
                            f"the last {store.capacity} stored responses in memory (--responses-store).",
                       param="previous_response_id", code="previous_response_not_found")
    return stored.conversation


async def create_response(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_body(request, ResponsesRequest)
    check_model_name(request, engine, body.model)
    store = store_of(request)
    keep = _keeps(body, store)
    history = _previous(body, store)
    chat, new = body.to_chat(list(history))
    prepared = await prepare_translated_chat(request, engine, chat, _renamed)

    def on_done(response: ResponseObject, output: list[dict[str, Any]]) -> None:
        if keep:
            store.put(StoredResponse(response, (*history, *new, *output)))

    run = ResponseRun(prepared.completion(request, engine), echoed_fields(body, keep), on_done)
    return await respond(request, run, bool(body.stream))


def _stored(request: Request) -> tuple[ResponseStore, str, StoredResponse]:
    store, response_id = store_of(request), request.path_params["response_id"]
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                       code="response_not_found")
    return store, response_id, stored


async def get_response(request: Request) -> Response:
    _, _, stored = _stored(request)
    if request.query_params.get("stream", "false") != "false":
        raise invalid("stream", "Only background responses can be streamed again, and this server runs none; "
                                "GET the stored response without 'stream'.", code="unsupported_parameter")
    return JSONResponse(stored.response.model_dump())


async def delete_response(request: Request) -> Response:
    store, response_id, _ = _stored(request)
    store.delete(response_id)
    return JSONResponse(ResponseDeleted(id=response_id).model_dump())


routes: list[BaseRoute] = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
]
