"""SIGTERM while a stream runs: the stream completes, new requests are turned away, the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from .conftest import LIVE_MAX_MODEL_LEN, server_process
from .helpers import HELLO

MAX_TOKENS = 64
COUNT = "Count from 1 to 500, separated by commas."
"""Neither API has vLLM's ignore_eos: a prompt whose greedy answer runs long (122 tokens) instead."""


def test_sigterm_drains_a_stream_then_exits_0():
    with server_process("--max-model-len", str(LIVE_MAX_MODEL_LEN), "--kv-cache-memory", "0.1",
                        "--shutdown-timeout", "180", "--log-level", "info") as (process, base, log):
        assert httpx.get(base + "/ready", timeout=5).status_code == 200
        lines: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {"messages": HELLO, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        first_chunk.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_chunk.wait(60)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        # During the drain a new request is 503 server_draining while the listening socket is still open
        # (the first ~0.1 s, until uvicorn's main loop sees the signal), then the connection is refused.
        # A connection accepted just as uvicorn closes its listeners is closed before its request is read
        # ("closed"): no work was done for it and clients retry it like a refused one.
        outcomes = []
        try:
            late = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}, timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "server_draining"
            outcomes.append(503)
        except httpx.ConnectError:
            outcomes.append("refused")
        except httpx.RemoteProtocolError:
            outcomes.append("closed")
        try:
            assert httpx.get(base + "/ready", timeout=10).status_code == 503
            outcomes.append(503)
        except httpx.ConnectError:
            outcomes.append("refused")
        except httpx.RemoteProtocolError:
            outcomes.append("closed")
        time.sleep(0.5)  # by now uvicorn has closed the listening socket
        try:
            httpx.get(base + "/health", timeout=10)
            outcomes.append("answered")
        except httpx.ConnectError:
            outcomes.append("refused")
        assert outcomes[-1] == "refused", outcomes
        print("drain outcomes:", outcomes)
        assert process.poll() is None or not streamer.is_alive()
        streamer.join(timeout=120)
        assert not streamer.is_alive()
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
        assert process.wait(timeout=60) == 0, log.read_text()[-4000:]


def test_stream_open_at_the_shutdown_deadline_ends_with_an_error_event_then_done():
    """A stream far longer than --shutdown-timeout: at the deadline it ends with a server_shutdown error event and
    [DONE] (not a cut mid-stream), and the process still exits 0."""
    with server_process("--max-model-len", str(LIVE_MAX_MODEL_LEN), "--kv-cache-memory", "0.1",
                        "--shutdown-timeout", "1.5", "--log-level", "info") as (process, base, log):
        body = {"messages": HELLO, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        signalled_at = 0.0
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 2:
                        process.send_signal(signal.SIGTERM)
                        signalled_at = time.monotonic()
        ended_after = time.monotonic() - signalled_at
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: "):])["error"]
        assert error["code"] == "server_shutdown" and error["type"] == "server_error"
        assert all("error" not in json.loads(line[len("data: "):]) for line in lines[:-2])
        assert 0.5 < ended_after < 2.5, ended_after
        assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
        assert "Traceback" not in log.read_text()


def test_model_none_is_not_ready_and_exits_0_on_sigterm():
    with server_process("--model", "none", "--shutdown-timeout", "5", "--log-level", "warning",
                        wait_healthy=False) as (process, base, log):
        deadline = time.monotonic() + 120
        response = None
        while response is None and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-4000:]
            try:
                response = httpx.get(base + "/ready", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.3)
        assert response is not None and response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_loaded"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-4000:]


def test_watch_signals_marks_the_app_and_keeps_sigterm_from_being_reraised():
    from starlette.datastructures import State

    from nitro_torch.server.http.draining import watch_signals

    class FakeServer:  # what uvicorn's Server.handle_exit does with a signal
        def __init__(self) -> None:
            self._captured_signals: list[int] = []

        def handle_exit(self, sig, frame) -> None:
            self._captured_signals.append(sig)

    server, state = FakeServer(), State()
    state.draining = False
    originals = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        watch_signals(state)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert state.draining
        assert server._captured_signals == []
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert server._captured_signals == [signal.SIGINT]  # Ctrl-C still ends the process as an interrupt
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


def test_responses_and_messages_streams_cut_at_the_deadline_end_in_their_own_error_event():
    """The Responses and Anthropic streams are cut like chat's, but end in their API's error event (a client of
    those APIs ignores OpenAI's `data:`-only error): response.failed, and Anthropic's `event: error`."""
    streams = {
        "/v1/responses": {"input": COUNT, "max_output_tokens": 1500, "temperature": 0, "stream": True, "store": False},
        "/v1/messages": {"messages": [{"role": "user", "content": COUNT}], "max_tokens": 1500, "temperature": 0,
                        "stream": True},
    }
    with server_process("--max-model-len", str(LIVE_MAX_MODEL_LEN), "--kv-cache-memory", "0.1",
                        "--shutdown-timeout", "0.5", "--log-level", "info") as (process, base, log):
        events: dict[str, list[tuple[str, dict]]] = {path: [] for path in streams}
        started = {path: threading.Event() for path in streams}

        def read(path: str) -> None:
            with httpx.stream("POST", base + path, json=streams[path], timeout=60) as response:
                name = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: "):]
                    elif line.startswith("data: "):
                        events[path].append((name, json.loads(line[len("data: "):])))
                        if len(events[path]) >= 4:
                            started[path].set()

        readers = [threading.Thread(target=read, args=(path,)) for path in streams]
        for reader in readers:
            reader.start()
        assert all(event.wait(60) for event in started.values())
        process.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=30)
        name, last = events["/v1/responses"][-1]
        assert name == last["type"] == "response.failed", events["/v1/responses"][-2:]
        assert last["response"]["error"]["code"] == "server_shutdown"
        numbers = [data["sequence_number"] for _, data in events["/v1/responses"]]
        assert numbers == list(range(len(numbers)))
        name, last = events["/v1/messages"][-1]
        assert name == last["type"] == "error", events["/v1/messages"][-2:]
        assert "shutting down" in last["error"]["message"]
        assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
        assert "Traceback" not in log.read_text()
