"""Secure by default: an optional API key, CORS only when asked for, and prompt logging only when asked for.

All pure ASGI middlewares (BaseHTTPMiddleware would buffer streams). `middleware(config)` gives the list that
`create_app` puts inside the request-id layer: CORS, then auth, then prompt logging.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nitro_torch.config import Config
from nitro_torch.server.errors import APIError

logger = logging.getLogger("nitro_torch.server")

PUBLIC_PATHS: frozenset[str] = frozenset({"/health", "/healthz", "/ready", "/"})
"""Answer without the API key: probes, and the chat page (it asks for the key and sends it with every API call)."""
PUBLIC_PREFIXES: tuple[str, ...] = ("/static/",)
"""The chat page's own files: public, as the page is."""
METRICS_PATHS: frozenset[str] = frozenset({"/metrics"})
"""Answer without the API key only with --metrics-public."""
INVALID_KEY_MESSAGE = (
    "Incorrect API key provided. Send the server's API key as 'Authorization: Bearer <key>' "
    "(set with --api-key or --api-key-file)."
)
PROMPT_FIELDS = ("messages", "prompt", "input")


def exempt_paths(config: Config) -> frozenset[str]:
    return PUBLIC_PATHS | (METRICS_PATHS if config.security.metrics_public else frozenset())


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def is_preflight(scope: Scope) -> bool:
    return (scope["method"] == "OPTIONS" and _header(scope, b"origin") is not None
            and _header(scope, b"access-control-request-method") is not None)


class APIKeyMiddleware:
    """401 `invalid_api_key` unless the request carries `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str, exempt: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self._key = api_key.encode()
        self.exempt = exempt

    def authorized(self, scope: Scope) -> bool:
        raw = _header(scope, b"authorization") or b""
        scheme, _, token = raw.partition(b" ")
        # compare_digest even when the scheme is wrong, so timing says nothing about the key
        matches = hmac.compare_digest(token.strip(), self._key)
        return scheme.lower() == b"bearer" and matches

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in self.exempt or path.startswith(PUBLIC_PREFIXES)
                or is_preflight(scope) or self.authorized(scope)):
            await self.app(scope, receive, send)
            return
        logger.info("401: missing or wrong API key for %s %s", scope["method"], scope["path"])
        response = APIError(401, INVALID_KEY_MESSAGE, type="invalid_request_error",
                            code="invalid_api_key").response(headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class PromptLogMiddleware:
    """--log-prompts: logs the JSON body's messages / prompt / input at INFO once the app has read the body.

    Nothing is buffered ahead of the app (the body limits of inner middlewares still apply); bodies over
    `max_bytes` are not logged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = 1 << 20) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        done = False

        async def logging_receive() -> Message:
            nonlocal size, done
            message = await receive()
            if message["type"] == "http.request" and not done:
                body = message.get("body", b"")
                size += len(body)
                if size <= self.max_bytes:
                    chunks.append(body)
                else:
                    chunks.clear()
                if not message.get("more_body", False):
                    done = True
                    if size <= self.max_bytes:
                        self._log(scope, b"".join(chunks))
                    chunks.clear()
            return message

        await self.app(scope, logging_receive, send)

    @staticmethod
    def _log(scope: Scope, body: bytes) -> None:
        try:
            data: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(data, dict):
            return
        for name in PROMPT_FIELDS:
            if name in data:
                logger.info("%s %s %s: %s", scope["method"], scope["path"], name,
                            json.dumps(data[name], ensure_ascii=False))


def parse_origins(raw: str | None) -> list[str]:
    return [origin.strip() for origin in (raw or "").split(",") if origin.strip()]


def middleware(config: Config) -> list[Middleware]:
    """CORS (only with --allowed-origins), the API key (only with one set), prompt logging (only with
    --log-prompts), outermost first."""
    security = config.security
    stack: list[Middleware] = []
    origins = parse_origins(security.allowed_origins)
    if origins:
        # Bearer keys, not cookies: never allow_credentials (and never with "*").
        stack.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-Id"],
                                allow_credentials=False))
    if security.api_key:
        stack.append(Middleware(APIKeyMiddleware, api_key=security.api_key, exempt=exempt_paths(config)))
    if security.log_prompts:
        stack.append(Middleware(PromptLogMiddleware))
    return stack
