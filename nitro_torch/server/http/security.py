"""Secure by default: optional API keys, CORS only when asked for, and prompt logging only when asked for.

Two kinds of key: the user key (--api-key) opens every route but the probes; the admin key (--admin-api-key),
when set, is the only key for the model-management routes (loadmodel, unloadmodel) and opens every other route
too. With an admin key but no user key, only the model-management routes are closed.

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
from nitro_torch.server.http.errors import APIError

logger = logging.getLogger("nitro_torch.server")

PUBLIC_PATHS: frozenset[str] = frozenset({"/health", "/healthz", "/ready", "/"})
"""Answer without the API key: probes, and the chat page (it asks for the key and sends it with every API call)."""
PUBLIC_PREFIXES: tuple[str, ...] = ("/static/",)
"""The chat page's own files: public, as the page is."""
METRICS_PATHS: frozenset[str] = frozenset({"/metrics"})
"""Answer without the API key only with --metrics-public."""
INVALID_KEY_MESSAGE = (
    "Incorrect API key provided. Send the server's API key as 'Authorization: Bearer <key>' or 'x-api-key: <key>' "
    "(set with --api-key or --api-key-file)."
)
_SEND_ADMIN_KEY = ("it needs the server's admin API key as 'Authorization: Bearer <admin key>' (set with "
                   "--admin-api-key or --admin-api-key-file).")
ADMIN_KEY_MESSAGE = f"The user API key cannot load or unload the model for everyone: {_SEND_ADMIN_KEY}"
INVALID_ADMIN_KEY_MESSAGE = f"Incorrect API key provided. This route loads or unloads the model: {_SEND_ADMIN_KEY}"
ADMIN_PATHS: tuple[str, ...] = ("/inferences/llamacpp/loadmodel", "/inferences/llamacpp/unloadmodel")
"""Model management: matched case-insensitively (as Nitro's paths are), also below a root path or with a
trailing slash, so no spelling that reaches the routes slips past the admin key."""
PROMPT_FIELDS = ("messages", "prompt", "input")


def exempt_paths(config: Config) -> frozenset[str]:
    return PUBLIC_PATHS | (METRICS_PATHS if config.security.metrics_public else frozenset())


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def is_preflight(scope: Scope) -> bool:
    return (scope["method"] == "OPTIONS" and _header(scope, b"origin") is not None
            and _header(scope, b"access-control-request-method") is not None)


def is_admin_path(path: str) -> bool:
    return path.lower().rstrip("/").endswith(ADMIN_PATHS)


def _bearer_token(scope: Scope) -> tuple[bool, bytes]:
    """(whether the scheme is Bearer, the token)."""
    scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
    return scheme.lower() == b"bearer", token.strip()


def _presented_keys(scope: Scope) -> list[bytes]:
    """The Bearer token and the `x-api-key` header (Anthropic's clients send theirs there), those present."""
    is_bearer, token = _bearer_token(scope)
    x_api_key = _header(scope, b"x-api-key")
    return [key for key in (token if is_bearer else None, x_api_key.strip() if x_api_key else None) if key]


def _key_matches(token: bytes, key: bytes | None) -> bool:
    # compare_digest even without a key or with the wrong scheme, so timing says nothing about the keys
    return hmac.compare_digest(token, key or b"") and key is not None


class APIKeyMiddleware:
    """401 `invalid_api_key` unless the request carries `Authorization: Bearer <key>` or `x-api-key: <key>`
    (constant-time compares).

    `api_key` (the user key) guards every route but the exempt ones; None leaves them open. `admin_api_key`,
    when set, is the only key for the admin routes (a user key there: 403 `admin_key_required`) and is
    accepted everywhere else too.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, exempt: frozenset[str] = PUBLIC_PATHS,
                 admin_api_key: str | None = None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._admin_key = admin_api_key.encode() if admin_api_key else None
        self.exempt = exempt

    def authorized(self, scope: Scope) -> bool:
        return any(_key_matches(token, self._key) or _key_matches(token, self._admin_key)
                   for token in _presented_keys(scope))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or is_preflight(scope):
            await self.app(scope, receive, send)
            return
        if self._admin_key is not None and is_admin_path(path):
            error = self._admin_error(scope)
        elif self._key is None or path in self.exempt or path.startswith(PUBLIC_PREFIXES) or self.authorized(scope):
            error = None
        else:
            error = _invalid_key_error()
        if error is None:
            await self.app(scope, receive, send)
            return
        logger.info("%d: %s for %s %s", error.status, error.code, scope["method"], scope["path"])
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        await error.response(headers=headers, path=path)(scope, receive, send)

    def _admin_error(self, scope: Scope) -> APIError | None:
        tokens = _presented_keys(scope)
        if any(_key_matches(token, self._admin_key) for token in tokens):
            return None
        if any(_key_matches(token, self._key) for token in tokens):
            return APIError(403, ADMIN_KEY_MESSAGE, type="permission_error", code="admin_key_required")
        return _invalid_key_error(INVALID_ADMIN_KEY_MESSAGE)


def _invalid_key_error(message: str = INVALID_KEY_MESSAGE) -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key")


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
    """CORS (only with --allowed-origins), the API keys (only with one set), prompt logging (only with
    --log-prompts), outermost first."""
    security = config.security
    stack: list[Middleware] = []
    origins = parse_origins(security.allowed_origins)
    if origins:
        # Bearer keys, not cookies: never allow_credentials (and never with "*").
        stack.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                allow_headers=["Authorization", "Content-Type", "X-Api-Key", "Anthropic-Version"],
                                expose_headers=["X-Request-Id"],
                                allow_credentials=False))
    if security.api_key or security.admin_api_key:
        stack.append(Middleware(APIKeyMiddleware, api_key=security.api_key, exempt=exempt_paths(config),
                                admin_api_key=security.admin_api_key))
    if security.log_prompts:
        stack.append(Middleware(PromptLogMiddleware))
    return stack
