"""Server-sent events: `data: <json>\\n\\n` frames, ending with `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nitro_torch.server.http.draining import StreamDeadline

DONE_EVENT = b"data: [DONE]\n\n"
INTERNAL_ERROR_EVENT = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":"internal_error"}}\n\n'
)
"""Sent when a stream fails after its headers went out: the error can only travel as an event."""
SHUTDOWN_MESSAGE = "The server is shutting down and ended this stream before it finished (--shutdown-timeout)."


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SHUTDOWN_ERROR_EVENT = sse_event({"error": {"message": SHUTDOWN_MESSAGE, "type": "server_error", "param": None,
                                            "code": "server_shutdown"}})


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its event source.

    Closing the source is what aborts the engine request when the client goes away: Starlette cancels the
    stream on `http.disconnect`, and may do so while the source is parked at a `yield`.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], shutdown_events: Callable[[], bytes] | None = None) -> None:
        """`shutdown_events`: what ends the stream when the shutdown deadline cuts it, in the API's own events
        (default: OpenAI's error event, then [DONE])."""
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._shutdown_events = shutdown_events or (lambda: SHUTDOWN_ERROR_EVENT + DONE_EVENT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = getattr(getattr(scope.get("app"), "state", None), "stream_deadline", None)
        if isinstance(deadline, StreamDeadline):  # under run_server
            self.body_iterator = _ending_at(self._events, deadline, self._shutdown_events)
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


async def _ending_at(events: AsyncIterator[bytes], deadline: StreamDeadline,
                     shutdown_events: Callable[[], bytes]) -> AsyncIterator[bytes]:
    """`events` until they end or the shutdown deadline passes; then `shutdown_events()`."""
    iterator = aiter(events)
    while True:
        try:
            more, event = await deadline.next_item(iterator)
        except StopAsyncIteration:
            return
        if not more:
            yield shutdown_events()
            return
        assert event is not None
        yield event
