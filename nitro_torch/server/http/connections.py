"""Connection hygiene for `nitro-torch serve`: deadlines for a request's head and body, a cap on open connections,
an idle keep-alive limit, and accept errors logged once per interval.

uvicorn bounds neither how long a connection may take to send its request head nor its body: its
`limit_concurrency` answers 503 only once a head has arrived (a silent socket never gets there) and its
`timeout_keep_alive` is armed only after a response. Hypercorn and granian have the deadlines, but swapping the
server would change the drain and signal behaviour run_server builds on. So, as gunicorn and nginx do
(`client_header_timeout`, `client_body_timeout`), `GuardedH11Protocol` arms a timer when a connection waits for
a head (at connect and after each response) and another from the head until the end of the body. It subclasses
uvicorn's h11 protocol: what `http="auto"` picks when httptools is not installed (it is not a dependency), and
named explicitly so that installing httptools cannot drop the deadlines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from nitro_torch.config import ServerConfig
from nitro_torch.server.http.errors import BODY_TIMED_OUT, APIError

logger = logging.getLogger("nitro_torch.server")

LOG_INTERVAL_S = 10.0
"""Repeated connection events (timeouts, refusals, accept errors) are logged at most once per interval, counted."""
AUTO_MAX_CONNECTIONS = 4096
REFUSAL_LINGER_S = 1.0
"""How long a refused connection is kept to read what the client sends: closing a socket with unread input
resets it, and a reset can discard the 503 before the client reads it."""
MIN_LINGERING_REFUSALS = 8
ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"


def open_file_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one, as Go's runtime does at start-up: the soft default (often
    1024) is a relic of select(), and each connection holds a descriptor. The connection cap follows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS caps it below an unlimited hard limit
        logger.debug("could not raise the open-file limit from %d: %s", soft, exc)
        return
    logger.info("open-file limit raised from %d to %s", soft, "unlimited" if hard == resource.RLIM_INFINITY else hard)


def auto_max_connections() -> int:
    """Three quarters of the open-file limit (the rest is for the model, the engine, the log and refusals),
    at most 4096."""
    soft = open_file_limit()
    return AUTO_MAX_CONNECTIONS if soft is None else max(1, min(AUTO_MAX_CONNECTIONS, soft * 3 // 4))


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    """Seconds to send a request head (0: no limit)."""
    body_timeout: float
    """Seconds to send a body, from the end of its head (0: no limit)."""
    keep_alive_timeout: float
    max_connections: int
    """Open connections beyond which a new one is refused (0: no limit)."""
    max_lingering_refusals: int = MIN_LINGERING_REFUSALS
    """Refused connections kept open at once to read their input; more are closed right after the 503, so that a
    burst of refusals cannot use up the descriptors that the cap keeps free (accept would fail with EMFILE)."""

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionLimits:
        cap = auto_max_connections() if server.max_connections is None else server.max_connections
        soft = open_file_limit()
        spare = (soft - cap) // 2 if soft is not None and cap else 0
        return cls(server.header_timeout, server.body_timeout, server.keep_alive_timeout, cap,
                   max(MIN_LINGERING_REFUSALS, spare))


class ThrottledLog:
    """Counts an event and logs it at most once per `interval_s`, with the count since the last line."""

    def __init__(self, what: str, level: int = logging.WARNING, interval_s: float = LOG_INTERVAL_S) -> None:
        self.what = what
        self.level = level
        self.interval_s = interval_s
        self.count = 0
        """Events not logged yet."""
        self.total = 0
        self._last_line_at = -interval_s
        self._flush_timer: asyncio.TimerHandle | None = None

    def record(self) -> None:
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now - self._last_line_at >= self.interval_s:
            self._flush()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: the count goes out with the next line
            self._flush_timer = loop.call_later(self._last_line_at + self.interval_s - now, self._flush)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.count:
            now = time.monotonic()
            since = min(now - self._last_line_at, self.interval_s)
            logger.log(self.level, "%s: %d in the last %.0f s (%d in all)", self.what, self.count, since, self.total)
            self.count = 0
            self._last_line_at = now


class AcceptErrorFilter(logging.Filter):
    """On the "asyncio" logger: asyncio logs a failed accept (EMFILE...) with a traceback on every attempt, and
    under a descriptor shortage it retries thousands of times a second. This keeps one counted line per interval."""

    def __init__(self) -> None:
        super().__init__()
        self.errors = ThrottledLog(f"{ACCEPT_ERROR_MESSAGE} (no file descriptor left: see ulimit -n and "
                                   "--max-connections); new connections wait in the listen backlog")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(ACCEPT_ERROR_MESSAGE):
            return True
        self.errors.record()
        return False


def throttle_accept_errors() -> AcceptErrorFilter:
    accept_filter = AcceptErrorFilter()
    logging.getLogger("asyncio").addFilter(accept_filter)
    return accept_filter


def _http_response(error: APIError, reason: bytes) -> bytes:
    body = json.dumps(error.body()).encode()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            % (error.status, reason, len(body)))
    if error.status == 503:
        head += b"retry-after: 1\r\n"
    return head + b"\r\n" + body


def too_many_connections_error(limit: int) -> APIError:
    return APIError(503, f"The server has {limit} open connections, its limit (--max-connections); this one is "
                         "refused. Retry shortly, or reuse a connection.", type="service_unavailable",
                    code="too_many_connections")


def body_timeout_error(limit: float) -> APIError:
    return APIError(408, f"The request body did not arrive within {limit:g} s of its headers (--body-timeout).",
                    type="invalid_request_error", code="request_timeout")


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, half-closed, and closed once the client closes (or after
    REFUSAL_LINGER_S), reading and dropping its input meanwhile; at once when `lingering` is full."""

    def __init__(self, response: bytes, lingering: set[_Refusal], max_lingering: int) -> None:
        self.response = response
        self.lingering = lingering
        self.max_lingering = max_lingering
        self.transport: asyncio.Transport | None = None
        self.linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.response)
        if len(self.lingering) >= self.max_lingering:
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.lingering.add(self)
        self.linger = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lingering.discard(self)
        if self.linger is not None:
            self.linger.cancel()


@dataclass
class ConnectionEvents:
    refused: ThrottledLog
    header_timeouts: ThrottledLog
    body_timeouts: ThrottledLog

    @classmethod
    def for_limits(cls, limits: ConnectionLimits) -> ConnectionEvents:
        return cls(ThrottledLog(f"refused connections over --max-connections {limits.max_connections} (503)"),
                   ThrottledLog(f"closed connections that sent no complete request head within "
                                f"{limits.header_timeout:g} s (--header-timeout)", logging.INFO),
                   ThrottledLog(f"answered 408 to requests whose body did not arrive within {limits.body_timeout:g} s"
                                " (--body-timeout)", logging.INFO))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, a body deadline, a connection cap and a float keep-alive."""

    limits: ClassVar[ConnectionLimits]
    events: ClassVar[ConnectionEvents]
    refusals: ClassVar[set[_Refusal]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout  # type: ignore[assignment]  # call_later takes floats
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for_body = False
        """The armed deadline is the body's (else the head's)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cap = self.limits.max_connections
        if cap and len(self.connections) >= cap:
            self.events.refused.record()
            refusal = _Refusal(_http_response(too_many_connections_error(cap), b"Service Unavailable"),
                               self.refusals, self.limits.max_lingering_refusals)
            transport.set_protocol(refusal)
            refusal.connection_made(transport)
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, self._head_timed_out, for_body=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived
            self._disarm()
            if self.cycle.more_body:
                self._arm(self.limits.body_timeout, self._body_timed_out, for_body=True)
        elif self._waiting_for_body and cycle is not None and not cycle.more_body:
            self._disarm()  # the body is complete (a head deadline stays armed until a head arrives)

    def on_response_complete(self) -> None:
        # Waiting for the next head (the keep-alive timer bounds an idle wait, this one a slow head); armed first,
        # so a pipelined head that super() handles disarms it.
        if not self.transport.is_closing():
            self._arm(self.limits.header_timeout, self._head_timed_out, for_body=False)
        super().on_response_complete()

    def _arm(self, seconds: float, callback: Any, for_body: bool) -> None:
        self._disarm()
        if seconds > 0:
            self._deadline = self.loop.call_later(seconds, callback)
            self._waiting_for_body = for_body

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for_body = False

    def _head_timed_out(self) -> None:
        self._deadline = None
        self._waiting_for_body = False
        if not self.transport.is_closing():
            self.events.header_timeouts.record()
            self._close()

    def _body_timed_out(self) -> None:
        self._deadline = None
        self._waiting_for_body = False
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        self.events.body_timeouts.record()
        if not cycle.response_started:
            cast(dict, cycle.scope)[BODY_TIMED_OUT] = True
            self.transport.write(_http_response(body_timeout_error(self.limits.body_timeout), b"Request Timeout"))
            cycle.response_started = cycle.response_complete = True
            cycle.disconnected = True  # the app's read ends (http.disconnect) and its answer goes nowhere
            cycle.message_event.set()
        self._close()

    def _close(self) -> None:
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class for one server: uvicorn builds one instance per connection from a class."""
    return type("ServerH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "events": ConnectionEvents.for_limits(limits), "refusals": set()})
