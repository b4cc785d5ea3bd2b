"""GET /openapi.json: an OpenAPI 3.1 document of every route the app serves, built once per app.

Request bodies are the JSON schemas of the pydantic models that `parse_body` validates against, so the
document describes exactly what the server accepts; error answers are OpenAI's error body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import nitro_torch
from nitro_torch.config import Config
from nitro_torch.server.anthropic.protocol import (
    AnthropicErrorResponse,
    CountTokensRequest,
    CountTokensResponse,
    MessageResponse,
    MessagesRequest,
)
from nitro_torch.server.chat.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
)
from nitro_torch.server.http.errors import ErrorResponse
from nitro_torch.server.http.security import exempt_paths
from nitro_torch.server.nitro.api import PREFIX, LoadModelRequest
from nitro_torch.server.openai.completions import CompletionRequest, CompletionResponse
from nitro_torch.server.openai.embeddings import EmbeddingRequest, EmbeddingResponse
from nitro_torch.server.openai.responses_protocol import ResponseDeleted, ResponseObject, ResponsesRequest
from nitro_torch.server.openai.tokenize import DetokenizeRequest, TokenizeRequest, TokenizeResponse

OPENAPI_PATH = "/openapi.json"
REF = "#/components/schemas/{model}"
Schema = dict[str, Any]


def _object(required: tuple[str, ...] = (), **properties: Schema) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required)}


_STRING: Schema = {"type": "string"}
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_BOOLEAN: Schema = {"type": "boolean"}
_SSE_EVENT: Schema = {**_object(("data",), data=_STRING, event=_STRING, id=_STRING, retry={"type": "integer"}),
                      "description": "One server-sent event (OpenAPI 3.1 has a stream's schema describe each event): "
                                     "`data` is a JSON chunk, and `[DONE]` in the last event."}


@dataclass(frozen=True)
class Operation:
    """What one path does: `body` is the model its JSON body is validated against, `ok` its 200 body."""

    summary: str
    tag: str
    body: type[BaseModel] | None = None
    ok: type[BaseModel] | Schema | None = None
    stream: bool = False
    """200 may also be a text/event-stream (with `"stream": true`)."""
    media_type: str = "application/json"
    error: type[BaseModel] = ErrorResponse
    """Its error body: OpenAI's, or Anthropic's under /v1/messages."""


OPERATIONS: dict[str, Operation] = {
    "/v1/chat/completions": Operation("Create a chat completion", "OpenAI", ChatCompletionRequest,
                                      ChatCompletionResponse, stream=True),
    "/v1/completions": Operation("Create a text completion", "OpenAI", CompletionRequest, CompletionResponse,
                                 stream=True),
    "/v1/embeddings": Operation("Create embeddings", "OpenAI", EmbeddingRequest, EmbeddingResponse),
    "/v1/responses": Operation("Create a response", "OpenAI", ResponsesRequest, ResponseObject, stream=True),
    "GET /v1/responses/{response_id}": Operation("Retrieve a stored response", "OpenAI", ok=ResponseObject),
    "DELETE /v1/responses/{response_id}": Operation("Delete a stored response", "OpenAI", ok=ResponseDeleted),
    "/v1/models": Operation("List the served model", "OpenAI", ok=ModelList),
    "/v1/models/{model_id}": Operation("Retrieve the served model", "OpenAI", ok=ModelCard),
    "/v1/messages": Operation("Create a message (Anthropic's Messages API)", "Anthropic", MessagesRequest,
                              MessageResponse, stream=True, error=AnthropicErrorResponse),
    "/v1/messages/count_tokens": Operation("Count the prompt tokens of a message request", "Anthropic",
                                           CountTokensRequest, CountTokensResponse, error=AnthropicErrorResponse),
    "/tokenize": Operation("Tokenize a prompt or a conversation", "vLLM", TokenizeRequest, TokenizeResponse),
    "/detokenize": Operation("Turn token ids back into text", "vLLM", DetokenizeRequest,
                             _object(("prompt",), prompt=_STRING)),
    f"{PREFIX}/loadmodel": Operation(
        "Load a model, replacing the served one", "Nitro", LoadModelRequest,
        _object(("message", "model"), message=_STRING, model=_STRING, previous_model=_NULLABLE_STRING,
                ignored_options={"type": "array", "items": _STRING})),
    f"{PREFIX}/unloadmodel": Operation("Unload the served model", "Nitro",
                                       ok=_object(("message",), message=_STRING, model=_NULLABLE_STRING)),
    f"{PREFIX}/modelstatus": Operation(
        "The loaded model's facts", "Nitro",
        ok=_object(("model_loaded", "model_data"), model_loaded=_BOOLEAN, model=_STRING, state=_STRING,
                   model_data={"type": "string", "contentMediaType": "application/json"})),
    f"{PREFIX}/chat_completion": Operation("Nitro's alias of /v1/chat/completions", "Nitro",
                                           ChatCompletionRequest, ChatCompletionResponse, stream=True),
    f"{PREFIX}/embedding": Operation("Nitro's alias of /v1/embeddings", "Nitro", EmbeddingRequest,
                                     EmbeddingResponse),
    "/healthz": Operation("Liveness, with or without a model", "Probes",
                          ok=_object(("status",), status=_STRING, message=_STRING, model_loaded=_BOOLEAN)),
    "/health": Operation("Health: 200 with the engine's counters while a model serves", "Probes",
                         ok=_object(("status",), status=_STRING)),
    "/ready": Operation("Readiness: 200 while a model serves and the server is not draining", "Probes",
                        ok=_object(("status", "model"), status=_STRING, model=_STRING)),
    "/metrics": Operation("Prometheus metrics", "Probes", ok=_STRING, media_type="text/plain"),
    OPENAPI_PATH: Operation("This document", "Probes", ok={"type": "object"}),
    "/": Operation("The chat page (HTML; its scripts and styles are under /static/)", "Chat page", ok=_STRING,
                   media_type="text/html"),
}


def openapi_path(route_path: str) -> str:
    """Starlette's `{name:convertor}` as OpenAPI's `{name}`."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", route_path)


def served_operations(routes: list[Any]) -> list[tuple[str, str, Route]]:
    """(OpenAPI path, method, route) of every route the app dispatches to; HEAD (Starlette's twin of GET) left
    out, and a path served by two routes described once (the first one answers)."""
    seen: set[tuple[str, str]] = set()
    served = []
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = openapi_path(route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            if (path, method) not in seen:
                seen.add((path, method))
                served.append((path, method, route))
    return served


def component_schemas() -> tuple[dict[type[BaseModel], Schema], dict[str, Schema]]:
    """({model: its $ref}, components.schemas): requests in pydantic's validation mode, 200 bodies in its
    serialization mode (what `model_dump()` writes)."""
    modes: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = []
    for operation in OPERATIONS.values():
        modes.append((operation.error, "serialization"))
        if operation.body is not None:
            modes.append((operation.body, "validation"))
        if isinstance(operation.ok, type):
            modes.append((operation.ok, "serialization"))
    unique = list(dict.fromkeys(modes))
    refs, top = models_json_schema(unique, ref_template=REF)
    return {model: refs[(model, mode)] for model, mode in unique}, top.get("$defs", {})


def _path_parameters(path: str) -> list[Schema]:
    return [
        {"name": name, "in": "path", "required": True, "schema": _STRING} for name in re.findall(r"\{(\w+)\}", path)
    ]


def _operation(path: str, method: str, operation: Operation, refs: dict[type[BaseModel], Schema],
               public: bool) -> Schema:
    ok = refs[operation.ok] if isinstance(operation.ok, type) else operation.ok
    content = {operation.media_type: {"schema": ok or {}}}
    if operation.stream:
        content["text/event-stream"] = {"schema": _SSE_EVENT}
    spec: Schema = {
        "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
        "summary": operation.summary,
        "tags": [operation.tag],
        "responses": {
            "200": {"description": "OK", "content": content},
            "default": {"description": "An error",
                        "content": {"application/json": {"schema": refs[operation.error]}}},
        },
    }
    parameters = _path_parameters(path)
    if parameters:
        spec["parameters"] = parameters
    if operation.body is not None and method == "POST":
        spec["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[operation.body]}}}
    if public:
        spec["security"] = []
    return spec


def build_document(routes: list[Any], config: Config) -> Schema:
    """The document for `routes` (an app's); KeyError for a route missing from OPERATIONS (keyed by path, or by
    \"METHOD path\" where one path's methods differ)."""
    refs, schemas = component_schemas()
    public = exempt_paths(config)
    paths: dict[str, Schema] = {}
    for path, method, route in served_operations(routes):
        operation = OPERATIONS.get(f"{method} {path}") or OPERATIONS[path]
        paths.setdefault(path, {})[method.lower()] = _operation(path, method, operation, refs,
                                                                route.path in public)
    # Without --api-key a bearer token is accepted and ignored, so the scheme is optional then.
    security: list[Schema] = [{"bearer": []}, {"x-api-key": []}]
    if not config.security.api_key:
        security.append({})
    return {
        "openapi": "3.1.0",
        "info": {"title": "nitro_torch", "version": nitro_torch.__version__,
                 "description": "OpenAI-compatible (and Nitro-compatible) LLM server."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "security": security,
    }


def document(app: Any) -> Schema:
    """The app's document, built on first use and kept on `app.state`."""
    cached = getattr(app.state, "openapi_document", None)
    if cached is None:
        cached = app.state.openapi_document = build_document(app.routes, app.state.config)
    return cached


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(document(request.app))


routes = [Route(OPENAPI_PATH, openapi_json, methods=["GET"])]
