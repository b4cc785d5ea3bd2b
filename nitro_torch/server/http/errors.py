"""OpenAI-style error bodies, and handlers that turn every failure into one (never a stack trace)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from nitro_torch.engine.client import ContextLengthExceeded, EngineDeadError
from nitro_torch.sampling import SamplingParamsError

logger = logging.getLogger("nitro_torch.server")

BODY_TIMED_OUT = "nitro_torch.body_timed_out"
"""Scope key the connection layer (http/connections.py) sets on a request whose body missed --body-timeout."""

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the client should see, with OpenAI's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers
        """Sent with the answer (e.g. Retry-After)."""

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
        """`path`: the request's, which picks the error shape (see register_error_shape)."""
        return JSONResponse(error_body(self, path), status_code=self.status, headers=headers or self.headers)


ErrorRenderer = Callable[[APIError], dict[str, Any]]
_ERROR_SHAPES: dict[str, ErrorRenderer] = {}


def register_error_shape(path_prefix: str, render: ErrorRenderer) -> None:
    """Errors answered on `path_prefix` or below it are written by `render`, the middlewares' included: an API
    whose clients expect their own error body (Anthropic's /v1/messages)."""
    _ERROR_SHAPES[path_prefix] = render


def error_body(error: APIError, path: str = "") -> dict[str, Any]:
    for prefix, render in _ERROR_SHAPES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return render(error)
    return error.body()


def invalid_json_error(exc: json.JSONDecodeError) -> APIError:
    return APIError(
        400,
        f"We could not parse the JSON body of your request: {exc.msg} at line {exc.lineno} column {exc.colno} "
        f"(char {exc.pos}). The request body must be valid JSON.",
        code="invalid_json",
    )


def _dotted_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, with `param` set to the dotted path of the offending field."""
    first = exc.errors(include_url=False)[0]
    param = _dotted_path(tuple(first.get("loc", ()))) or None
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}."
    else:
        message = f"Invalid request: {first.get('msg', 'invalid value')}."
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return APIError(400, message, param=param, code=code)


def context_length_error(exc: ContextLengthExceeded) -> APIError:
    return APIError(400, str(exc), param="messages", code="context_length_exceeded")


def sampling_params_error(exc: SamplingParamsError) -> APIError:
    return APIError(400, str(exc), param=exc.param, code="invalid_value")


def _path(request: Request) -> str:
    return request.scope.get("path", "")


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response(path=_path(request))


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return validation_error(exc).response(path=_path(request))


async def handle_sampling_params_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SamplingParamsError)
    return sampling_params_error(exc).response(path=_path(request))


async def handle_context_length_exceeded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ContextLengthExceeded)
    return context_length_error(exc).response(path=_path(request))


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error = APIError(
            404,
            f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos.",
            code="unknown_url",
        )
    elif exc.status_code == 405:
        allowed = headers.get("Allow") or headers.get("allow") or ""
        error = APIError(
            405,
            f"Method {request.method} is not allowed for {request.url.path}"
            + (f"; allowed: {allowed}." if allowed else "."),
            code="method_not_allowed",
        )
    else:
        error = APIError(exc.status_code, str(exc.detail))
    return error.response(headers=headers or None, path=_path(request))


async def handle_engine_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("engine error on %s %s: %s", request.method, request.url.path, exc)
    return APIError(503, "The inference engine has stopped; the request was not served.", type="server_error",
                    code="engine_dead").response(path=_path(request))


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    # The client left while its body was read: nothing went wrong here, and nobody is left to answer.
    if request.scope.get(BODY_TIMED_OUT):
        return Response(status_code=408)  # the connection layer answered, and logs these counted
    logger.info("client disconnected before its request was served: %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def handle_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The details go to the server log only: a client must never see paths or stack frames.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error").response(path=_path(request))


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    ValidationError: handle_validation_error,
    SamplingParamsError: handle_sampling_params_error,
    ContextLengthExceeded: handle_context_length_exceeded,
    EngineDeadError: handle_engine_error,
    HTTPException: handle_http_exception,
    ClientDisconnect: handle_client_disconnect,
    Exception: handle_unexpected_error,
}
