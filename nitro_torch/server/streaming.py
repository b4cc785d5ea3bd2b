"""Server-sent events: `data: <json>\\n\\n` frames, ending with `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nitro_torch.server.draining import StreamDeadline

DONE_EVENT = b"data: [DONE]\n\n"
INTERNAL_ERROR_EVENT = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":"internal_error"}}\n\n'
)
"""Sent when a stream fails after its headers went out: the error can only travel as an event."""
SHUTDOWN_ERROR_EVENT = (
    b'data: {"error":{"message":"The server is shutting down and ended this stream before it finished '
    b'(--shutdown-timeout).","type":"server_error","param":null,"code":"server_shutdown"}}\n\n'
)


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its event source.

    Closing the source is what aborts the engine request when the client goes away: Starlette cancels the
    stream on `http.disconnect`, and may do so while the source is parked at a `yield`.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = getattr(getattr(scope.get("app"), "state", None), "stream_deadline", None)
        if isinstance(deadline, StreamDeadline):  # under run_server
            self.body_iterator = _ending_at(self._events, deadline)
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


async def _ending_at(events: AsyncIterator[bytes], deadline: StreamDeadline) -> AsyncIterator[bytes]:
    """`events` until they end or the shutdown deadline passes; then an error event and [DONE]."""
    iterator = aiter(events)
    while True:
        try:
            more, event = await deadline.next_item(iterator)
        except StopAsyncIteration:
            return
        if not more:
            yield SHUTDOWN_ERROR_EVENT
            yield DONE_EVENT
            return
        assert event is not None
        yield event
