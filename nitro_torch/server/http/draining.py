"""Graceful shutdown: mark the app as draining the moment SIGTERM/SIGINT arrives.

run_server sets `app.state.drain_on_signal`; the app's lifespan start-up (which runs inside uvicorn, after
uvicorn installed its own signal handlers) then wraps those handlers with `watch_signals`. On the signal the app
turns new requests away (503 `server_draining`, /ready 503) and uvicorn closes the listening socket, lets open
connections finish their responses (streams included) for up to `timeout_graceful_shutdown` seconds
(`--shutdown-timeout`) and runs the lifespan shutdown. Unlike plain uvicorn, SIGTERM is not re-raised after that
graceful exit, so the process exits 0 (SIGINT still is: Ctrl-C ends the process as an interrupt).

At that deadline uvicorn cancels what still runs, which would cut a stream mid-chunk with neither an error nor
`[DONE]`. So a `StreamDeadline` (on `app.state.stream_deadline`) comes STREAM_END_MARGIN_S earlier: the streams still
open then end with an error event and `[DONE]` (http/sse.py), and their engine requests are aborted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any, TypeVar

logger = logging.getLogger("nitro_torch.server")

STREAM_END_MARGIN_S = 0.5
"""Streams end this long before the shutdown deadline; uvicorn cancels tasks at ceil(--shutdown-timeout) plus its
0.1-0.2 s to notice the signal, so at least 0.6 s remain to send their last events."""
_T = TypeVar("_T")


class StreamDeadline:
    """When open streams must end: unset until the first SIGTERM/SIGINT, then --shutdown-timeout after it, less
    STREAM_END_MARGIN_S (event-loop time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.when: float | None = None
        self._waits: set[asyncio.Timeout] = set()

    def arm(self, delay_s: float) -> None:
        if self.when is not None:
            return
        self.when = self.loop.time() + max(0.0, delay_s)
        for wait in list(self._waits):
            wait.reschedule(self.when)

    def passed(self) -> bool:
        return self.when is not None and self.loop.time() >= self.when

    async def next_item(self, iterator: AsyncIterator[_T]) -> tuple[bool, _T | None]:
        """(True, the next item) or, once the deadline passed, (False, None), cancelling the wait for the item.
        StopAsyncIteration passes through."""
        if self.passed():
            return False, None
        timeout = asyncio.timeout_at(self.when)
        try:
            async with timeout:
                self._waits.add(timeout)
                try:
                    return True, await anext(iterator)
                finally:
                    self._waits.discard(timeout)
        except TimeoutError:
            if timeout.expired():
                return False, None
            raise


def watch_signals(state: Any) -> None:
    """Wrap the current SIGTERM/SIGINT handlers (uvicorn's) so that they first set `state.draining` and arm
    `state.stream_deadline`. Called from the app's lifespan, on uvicorn's running loop."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's (an in-process test server has none)
    try:
        deadline: StreamDeadline | None = StreamDeadline(asyncio.get_running_loop())
    except RuntimeError:
        deadline = None  # no loop to end streams on
    state.stream_deadline = deadline
    config = getattr(state, "config", None)
    shutdown_timeout = config.server.shutdown_timeout if config is not None else 0.0
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            if not getattr(state, "draining", False):
                state.draining = True
                logger.info("signal %d: draining; requests in flight may finish", signum)
                if deadline is not None:
                    deadline.loop.call_soon_threadsafe(deadline.arm, shutdown_timeout - STREAM_END_MARGIN_S)
            previous(signum, frame)
            if signum == signal.SIGTERM:  # uvicorn re-raises captured signals after its graceful exit
                captured = getattr(getattr(previous, "__self__", None), "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

        signal.signal(sig, handler)
