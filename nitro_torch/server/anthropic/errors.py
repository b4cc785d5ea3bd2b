"""Anthropic's error body, `{"type": "error", "error": {"type", "message"}}`, for every error answered under
/v1/messages (the routes', the exception handlers' and the middlewares'), with the same HTTP status codes."""

from __future__ import annotations

import json
from typing import Any

from nitro_torch.server.anthropic.protocol import AnthropicErrorResponse, ErrorDetail
from nitro_torch.server.http.errors import APIError, register_error_shape

PATH_PREFIX = "/v1/messages"
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_PARAM_NAMES = {"stop": "stop_sequences", "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
                "response_format": "output_config.format"}
"""The chat pipeline's field names, as an Anthropic request spells them."""


def error_type(error: APIError) -> str:
    if error.type == "server_error":  # a failure of the server itself (engine dead, internal error), not its load
        return "api_error"
    return _TYPE_BY_STATUS.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")


def anthropic_body(error: APIError) -> dict[str, Any]:
    return AnthropicErrorResponse(error=ErrorDetail(type=error_type(error), message=error.message)).model_dump()


def error_event(error: APIError) -> bytes:
    """The error as an SSE event: how a stream whose headers are sent reports a failure."""
    data = json.dumps(anthropic_body(error), ensure_ascii=False, separators=(",", ":"))
    return f"event: error\ndata: {data}\n\n".encode()


def renamed(error: APIError) -> APIError:
    """`error` from the chat pipeline, its field named as the Anthropic request names it."""
    name = _PARAM_NAMES.get(error.param or "")
    if name is None:
        return error
    message = error.message.replace(f"'{error.param}'", f"'{name}'")
    return APIError(error.status, message, type=error.type, param=name, code=error.code, headers=error.headers)


register_error_shape(PATH_PREFIX, anthropic_body)
