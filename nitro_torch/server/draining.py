"""Graceful shutdown: mark the app as draining the moment SIGTERM/SIGINT arrives.

run_server sets `app.state.drain_on_signal`; the app's lifespan start-up (which runs inside uvicorn, after
uvicorn installed its own signal handlers) then wraps those handlers with `watch_signals`. On the signal the app
turns new requests away (503 `server_draining`, /ready 503) and uvicorn closes the listening socket, lets open
connections finish their responses (streams included) for up to `timeout_graceful_shutdown` seconds
(`--shutdown-timeout`) and runs the lifespan shutdown. Unlike plain uvicorn, SIGTERM is not re-raised after that
graceful exit, so the process exits 0 (SIGINT still is: Ctrl-C ends the process as an interrupt).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger("nitro_torch.server")


def watch_signals(state: Any) -> None:
    """Wrap the current SIGTERM/SIGINT handlers (uvicorn's) so that they first set `state.draining`."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's (an in-process test server has none)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            if not getattr(state, "draining", False):
                state.draining = True
                logger.info("signal %d: draining; requests in flight may finish", signum)
            previous(signum, frame)
            if signum == signal.SIGTERM:  # uvicorn re-raises captured signals after its graceful exit
                captured = getattr(getattr(previous, "__self__", None), "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

        signal.signal(sig, handler)
