"""Admission control: a bounded queue (429 + Retry-After), a request-body limit (413), and draining (503).

`AdmissionMiddleware` is pure ASGI and sits right after the security layers (request id, CORS, API key), so it
answers before any body is parsed or tokenized:

* draining (`app.state.draining`, set by run_server as soon as SIGTERM/SIGINT arrives): every new request but
  the probes (`/health`, `/ready`, `/healthz`, `/metrics`) is 503 `server_draining`; requests already admitted
  finish undisturbed.
* `--max-queued-requests`: an engine request (chat, responses, messages, text completions, embeddings) is
  admitted once its body has been read (a slow upload waits for nothing but its own bytes, which --body-timeout
  bounds), and only while fewer than that many requests wait for the engine: the engine's `num_waiting` plus the
  requests this layer admitted that are not in the engine yet (tokenizing), less the engine's free running slots
  (`queued()`, which /metrics exports as `nitro:num_requests_waiting`). Beyond it: 429 `too_many_requests` with
  Retry-After, raised from the read that completes the body. 0 disables the bound.
* `--max-request-bytes`: a Content-Length over the limit is 413 at once; a body without (or with a lying)
  Content-Length is counted while it is read and cut off with 413 as soon as it passes the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nitro_torch.server.http.errors import APIError, error_body

ENGINE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/inferences/llamacpp/chat_completion",
                          "/v1/embeddings", "/v1/responses", "/v1/messages"})
"""Routes that queue work in the engine (matched case-insensitively, as Nitro's paths are). An embedding
request never becomes a live generation, so it counts as waiting for as long as it is served."""
PROBE_PATHS = frozenset({"/health", "/ready", "/healthz", "/metrics"})
"""Answered while draining too (liveness, readiness, metrics)."""
RETRY_AFTER_S = 1


def draining_error() -> APIError:
    return APIError(503, "The server is shutting down and accepts no new requests.", type="service_unavailable",
                    code="server_draining")


def too_large_error(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    type="invalid_request_error", code="request_too_large", headers={"Connection": "close"})


class _RefusedWhileReading(APIError):
    """Raised from `receive` while the app reads the body: the app's APIError handler answers it."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.status, error.message, type=error.type, code=error.code, headers=error.headers)


def overloaded_error(limit: int) -> APIError:
    return APIError(429, f"The server is overloaded: {limit} requests are already waiting. Retry shortly.",
                    type="rate_limit_exceeded", code="too_many_requests", headers={"Retry-After": str(RETRY_AFTER_S)})


async def _send_error(send: Send, error: APIError, headers: dict[str, str] | None = None, path: str = "") -> None:
    body = json.dumps(error_body(error, path)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, max_queued_requests: int = 1024, max_request_bytes: int = 8 << 20) -> None:
        self.app = app
        self.max_queued_requests = max_queued_requests
        self.max_request_bytes = max_request_bytes
        self.pending = 0
        """Engine requests admitted here (their body read) and not finished: in the engine or on their way to it."""

    def queued(self, app: Any) -> int:
        """Requests waiting for the engine, as this layer and the engine see them together."""
        host = getattr(app.state, "host", None) if app is not None else None
        engine = host.engine if host is not None else getattr(getattr(app, "state", None), "engine", None)
        if engine is None:
            return self.pending
        stats = engine.stats()
        not_in_engine = max(0, self.pending - engine.num_live_requests)
        free_slots = max(0, engine.info.max_num_seqs - stats.num_running)
        return max(0, stats.num_waiting + not_in_engine - free_slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        state = getattr(app, "state", None)
        if state is not None and getattr(state, "admission", None) is not self:
            state.admission = self  # for /metrics: the waiting gauge is `queued()`
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").lower().rstrip("/") or "/"
        if getattr(state, "draining", False) and path not in PROBE_PATHS:
            await _send_error(send, draining_error(), {"Connection": "close"}, path)
            return
        limit = self.max_request_bytes
        if limit > 0:
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    try:
                        declared = int(value)
                    except ValueError:
                        declared = 0
                    if declared > limit:
                        await _send_error(send, too_large_error(limit), {"Connection": "close"}, path)
                        return
        queues_work = scope.get("method") == "POST" and path in ENGINE_PATHS
        admitted = False

        def admit() -> None:
            nonlocal admitted
            if self.max_queued_requests > 0 and self.queued(app) >= self.max_queued_requests:
                raise _RefusedWhileReading(overloaded_error(self.max_queued_requests))
            self.pending += 1
            admitted = True

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, self._reading(receive, limit, admit if queues_work else None), tracking_send)
        except _RefusedWhileReading as refused:  # an app without the APIError handler
            if not started:
                await _send_error(send, refused, refused.headers, path)
        finally:
            if admitted:
                self.pending -= 1

    @staticmethod
    def _reading(receive: Receive, limit: int, on_body_read: Callable[[], None] | None) -> Receive:
        """`receive`, cutting the body off past `limit` bytes (0: none) and calling `on_body_read` once it is
        complete."""
        received = 0

        async def reading_receive() -> Message:
            nonlocal received, on_body_read
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if 0 < limit < received:
                    raise _RefusedWhileReading(too_large_error(limit))
                if on_body_read is not None and not message.get("more_body", False):
                    admit, on_body_read = on_body_read, None
                    admit()
            return message

        return reading_receive


async def ready(request: Any) -> Any:
    """Readiness: 200 only while a model is loaded and serving and the server is not draining; 503 otherwise."""
    from starlette.responses import JSONResponse

    if getattr(request.app.state, "draining", False):
        raise draining_error()
    host = getattr(request.app.state, "host", None)
    error = host.unavailable_error() if host is not None else None
    if error is not None:
        raise error
    engine = host.engine if host is not None else getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "No model is loaded.", code="model_not_loaded")
    if not engine.is_alive:
        raise APIError(503, "The inference engine has stopped.", type="server_error", code="engine_dead")
    return JSONResponse({"status": "ready", "model": engine.model_name})
