"""Connection hygiene of `nitro-torch serve` (server/http/connections.py), against the real server process as hostile
clients reach it: silent sockets under a low descriptor limit, slowloris heads, connections over the cap, idle
keep-alive."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from .conftest import LIVE_MAX_MODEL_LEN, server_process
from .helpers import HELLO

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
FD_LIMIT = 256
SILENT_SOCKETS = 300


@contextmanager
def serve(*options: str, fd_limit: int | None = None,
          hard_fd_limit: int | None = None) -> Iterator[tuple[subprocess.Popen, str, int, Path]]:
    """`nitro-torch serve` (under `ulimit -n fd_limit`, hard limit `hard_fd_limit` or the same, when given);
    yields (process, base URL, port, log)."""

    def limit_descriptors() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard_fd_limit or fd_limit))

    with server_process("--max-model-len", str(LIVE_MAX_MODEL_LEN), "--kv-cache-memory", "0.1", "--log-level",
                        "info", *options, preexec_fn=limit_descriptors) as (process, base, log):
        yield process, base, int(base.rsplit(":", 1)[1]), log


@pytest.fixture(scope="module")
def low_fd_server() -> Iterator[tuple[subprocess.Popen, str, int, Path]]:
    with serve("--header-timeout", str(HEADER_TIMEOUT_S), fd_limit=FD_LIMIT) as server:
        yield server


def _line_count(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for _ in file)


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or reset, after whatever it answered)."""
    try:
        while data := sock.recv(65536):
            del data
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _wait_closed(socks: list[socket.socket], timeout_s: float) -> list[socket.socket]:
    """The sockets still open after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    open_socks = list(socks)
    while open_socks and time.monotonic() < deadline:
        time.sleep(0.1)
        open_socks = [s for s in open_socks if not _closed_by_server(s)]
    return open_socks


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, head and body."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _chat(base: str) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=30)


def test_silent_sockets_under_a_low_descriptor_limit(low_fd_server):
    process, base, port, log = low_fd_server
    lines_before = _line_count(log)
    silent = []
    for _ in range(SILENT_SOCKETS):  # more than the server's descriptors: connect, then say nothing
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        silent.append(sock)
    try:
        started = time.monotonic()
        answered = None
        while answered is None and time.monotonic() - started < 20:
            try:
                reply = _chat(base)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if reply.status_code == 200:
                answered = time.monotonic() - started
            else:  # over the connection cap while the silent sockets hold it: a clear refusal
                assert reply.status_code == 503 and reply.json()["error"]["code"] == "too_many_connections"
                time.sleep(0.2)
        assert answered is not None, "a normal chat never got through"
        # the server closes them all: those it held at the head deadline, those over the cap at once (503), and
        # those still in the listen backlog once it accepted them
        still_open = _wait_closed(silent, 4 * HEADER_TIMEOUT_S + 10)
        assert not still_open, f"{len(still_open)} of {SILENT_SOCKETS} silent sockets still open"
        print(f"chat answered after {answered:.1f} s; all silent sockets closed after "
              f"{time.monotonic() - started:.1f} s")
    finally:
        for sock in silent:
            sock.close()
    assert process.poll() is None
    assert _chat(base).status_code == 200
    time.sleep(0.5)
    grown = _line_count(log) - lines_before
    print(f"log grew by {grown} lines")
    assert grown < 40, log.read_text()[-4000:]  # counted summaries, not a line (or traceback) per attempt
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("after_a_request", [False, True], ids=["fresh", "after-a-keep-alive-request"])
def test_slowloris_head_is_closed_at_the_header_deadline(low_fd_server, after_a_request):
    _, base, port, _ = low_fd_server
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if after_a_request:  # one quick request first: the next head on the kept-alive connection has a deadline too
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.setblocking(False)
        started = time.monotonic()
        closed_after = None
        for byte in head * 10:  # one byte every 50 ms: never a complete head
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            if _closed_by_server(sock):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.05)
    assert closed_after is not None, "the server kept a trickling head open"
    assert HEADER_TIMEOUT_S - 0.1 <= closed_after < HEADER_TIMEOUT_S + 2.0, closed_after
    assert _chat(base).status_code == 200


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    """A soft limit of 256 under a higher hard one (a common login default is 1024 / 4096+): the server lifts it,
    so the connection cap (three quarters of it) is not set by a relic of select()."""
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    with serve(fd_limit=FD_LIMIT, hard_fd_limit=hard) as (process, _, _, log):
        limits = Path(f"/proc/{process.pid}/limits").read_text().splitlines()
        [line] = [line for line in limits if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
        assert f"open-file limit raised from {FD_LIMIT} to {hard}" in log.read_text()


def test_over_max_connections_is_503_and_closed():
    with serve("--max-connections", "4", "--header-timeout", "30", "--keep-alive-timeout", "1") as (_, base, port, _):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            time.sleep(0.5)  # accepted: 4 open connections, the cap
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                started = time.monotonic()
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := extra.recv(65536):  # until the server closes it
                    answer += chunk
                waited = time.monotonic() - started
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer
            assert b"connection: close" in head.lower() and b"content-type: application/json" in head.lower()
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and "--max-connections" in error["message"]
            assert waited < 1.0  # answered and closed at once, not left hanging
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        # below the cap again; and an idle keep-alive connection is closed after --keep-alive-timeout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert sock.recv(65536) == b""
            assert 0.8 <= time.monotonic() - started < 3.0
