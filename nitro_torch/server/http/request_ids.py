"""Request ids: taken from the client's `X-Request-Id` (when it is a sane token) or made up, returned on every
response, and put on every log record made while the request runs (`record.request_id`, "-" outside requests).

`RequestIdMiddleware` is a pure ASGI middleware (BaseHTTPMiddleware would buffer streams); `wrap_outermost`
puts it outside Starlette's ServerErrorMiddleware, so 500s carry the id too.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
SCOPE_KEY = "nitro_torch.request_id"
MAX_LENGTH = 128
_SANE = re.compile(rf"[\x21-\x7e]{{1,{MAX_LENGTH}}}")  # printable ASCII, no spaces or control characters

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("nitro_torch_request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


def sane_request_id(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _SANE.fullmatch(text) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = sane_request_id(raw) or new_request_id()
        scope[SCOPE_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = request_id
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def wrap_outermost(app: Starlette) -> Starlette:
    """Make RequestIdMiddleware the outermost layer of `app` (outside ServerErrorMiddleware)."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIdMiddleware(build())  # type: ignore[method-assign]
    return app


_factory_installed = False


def install_log_record_factory() -> None:
    """Every LogRecord gets `request_id`: the running request's id, or "-" (idempotent)."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class RequestIdFilter(logging.Filter):
    """For handlers whose records may come from elsewhere: makes sure `record.request_id` is set."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


install_log_record_factory()
