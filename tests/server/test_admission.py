"""Admission control: a bounded engine queue (429 + Retry-After), the body-size limit (413) and /ready."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from nitro_torch.config import build_config

from .conftest import RunningServer, private_server
from .helpers import ENGINE_OPTIONS, HELLO, wait_until_idle

MAX_TOKENS = 48


@pytest.fixture
def small_server() -> Iterator[RunningServer]:
    """uvicorn in a thread over a private engine that runs one sequence at a time, with room for 2 waiting."""
    with private_server(max_num_seqs=1, kv_cache_memory=0.1, max_queued_requests=2,
                        max_request_bytes=4096) as server:
        yield server


def _stream(base_url: str, results: list, index: int) -> None:
    body = {"model": "", "messages": HELLO, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        answered = time.monotonic() - started
        if response.status_code != 200:
            results[index] = (response.status_code, answered, dict(response.headers), json.loads(response.read()))
            return
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    results[index] = (200, answered, dict(response.headers), lines)


def test_overload_is_429_and_admitted_requests_complete(small_server):
    base = small_server.base_url
    results: list = [None] * 10
    threads = [threading.Thread(target=_stream, args=(base, results, i)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert all(result is not None for result in results), results
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert 1 <= len(ok) <= 3, [r[0] for r in results]  # one running + at most 2 waiting
    assert refused
    for status, answered, headers, body in refused:
        assert status == 429
        assert answered < 2.0  # at once, not after the admitted requests (which take several seconds)
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "too_many_requests"
        assert body["error"]["type"] == "rate_limit_exceeded"
    for _, _, _, lines in ok:
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
        assert usage["total_tokens"] == usage["prompt_tokens"] + MAX_TOKENS
    # the server still answers, and everything went back
    reply = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200
    stats = wait_until_idle(small_server.engine)
    assert stats.kv_blocks_used == 0 and stats.num_waiting == 0


def test_embeddings_responses_and_messages_count_against_the_queue_bound(small_server):
    base = small_server.base_url
    results: list = [None] * 3
    threads = [threading.Thread(target=_stream, args=(base, results, i)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while small_server.engine.stats().num_waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # one running and two waiting: the bound of 2 is reached
    refused = httpx.post(base + "/v1/embeddings", json={"model": "", "input": "hello"}, timeout=60)
    refused_response = httpx.post(base + "/v1/responses", json={"input": "hello", "max_output_tokens": 2}, timeout=60)
    refused_message = httpx.post(base + "/v1/messages", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    for thread in threads:
        thread.join(timeout=180)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
    assert refused_response.status_code == 429 and refused_response.json()["error"]["code"] == "too_many_requests"
    assert refused_message.status_code == 429 and refused_message.json()["error"]["type"] == "rate_limit_error"
    assert [r[0] for r in results] == [200, 200, 200]
    answered = httpx.post(base + "/v1/embeddings", json={"model": "", "input": "hello"}, timeout=60)
    assert answered.status_code == 200


def test_body_over_the_limit_is_413(small_server):
    base = small_server.base_url
    big = {"messages": [{"role": "user", "content": "x" * 10_000}], "max_tokens": 1}
    response = httpx.post(base + "/v1/chat/completions", json=big, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 1000):
            yield payload[start:start + 1000]

    response = httpx.post(base + "/v1/chat/completions", content=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    # a body under the limit still works
    assert httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1},
                      timeout=60).status_code == 200


def test_lying_content_length_is_cut_off():
    """A Content-Length under the limit with a longer body: counted while read, 413 (in-process app)."""
    from nitro_torch.server.http.admission import AdmissionMiddleware

    seen: list[bytes] = []

    async def app(scope, receive, send):
        from nitro_torch.server.http.errors import APIError

        try:
            while True:
                message = await receive()
                seen.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except APIError as exc:
            response = exc.response()
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [{"type": "http.request", "body": b"a" * 60, "more_body": True},
                {"type": "http.request", "body": b"a" * 60, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    import asyncio

    scope = {"type": "http", "method": "POST", "path": "/tokenize", "headers": [(b"content-length", b"10")]}
    asyncio.run(AdmissionMiddleware(app, max_request_bytes=100)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(seen) == 1  # the second chunk was never handed to the app


def test_ready(engine_config, real_engine):
    from nitro_torch.server.app import create_app
    from nitro_torch.server.model_host import ModelHost

    with TestClient(create_app(engine_config, real_engine)) as client:
        response = client.get("/ready")
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "model": real_engine.model_name}
        client.app.state.draining = True
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["error"]["code"] == "server_draining"
        assert client.get("/health").status_code == 200  # liveness is not readiness
        refused = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"

    empty = build_config({**ENGINE_OPTIONS, "model": "none"}, env={})
    with TestClient(create_app(empty, host=ModelHost(empty))) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_loaded"


SLOW_UPLOADS = 1000


def _waiting_gauge(base_url: str) -> float:
    metrics = httpx.get(base_url + "/metrics", timeout=10).text
    return float(next(line.rsplit(" ", 1)[1] for line in metrics.splitlines()
                      if line.startswith("nitro:num_requests_waiting{")))


def test_slow_uploads_do_not_fill_the_queue():
    """1,000 clients send headers and 1 of 100 body bytes: they wait for their own bytes, not for the engine, so a
    chat is still served (not 429); the waiting gauge is the count that decides 429; the uploads get 408."""
    import socket

    from .conftest import server_process

    with server_process("--max-model-len", "2048", "--kv-cache-memory", "0.1", "--max-num-seqs", "1",
                        "--max-queued-requests", "2", "--body-timeout", "2", "--header-timeout", "30",
                        "--log-level", "warning") as (_, base, _):
        port = int(base.rsplit(":", 1)[1])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{")
        uploads = []
        try:
            for _ in range(SLOW_UPLOADS):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(head)
                uploads.append(sock)
            sent_at = time.monotonic()
            reply = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
            assert reply.status_code == 200, reply.text
            assert _waiting_gauge(base) == 0
            answers: dict[bytes, int] = {}
            for sock in uploads:
                sock.settimeout(max(0.1, sent_at + 30 - time.monotonic()))
                answer = b""
                try:
                    while chunk := sock.recv(65536):
                        answer += chunk
                except TimeoutError:
                    answer = b"(still open)"
                status = answer.split(b"\r\n", 1)[0]
                answers[status] = answers.get(status, 0) + 1
                if status.startswith(b"HTTP/1.1 408"):
                    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
                    assert error["code"] == "request_timeout" and "--body-timeout" in error["message"]
            assert answers == {b"HTTP/1.1 408 Request Timeout": SLOW_UPLOADS}, answers
            assert time.monotonic() - sent_at < 20
        finally:
            for sock in uploads:
                sock.close()

        # requests that really wait for the engine: the gauge shows them, and the 429 comes at that same number
        body = json.dumps({"messages": HELLO, "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        streams = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for sock in streams:
                sock.sendall(request)
            deadline = time.monotonic() + 60
            while _waiting_gauge(base) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _waiting_gauge(base) == 2  # one runs (--max-num-seqs 1), two wait: the bound of 2
            refused = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                                 timeout=60)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["message"].startswith("The server is overloaded: 2 requests")
        finally:
            for sock in streams:
                sock.close()  # the server aborts them
        deadline = time.monotonic() + 60
        while _waiting_gauge(base) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                          timeout=60).status_code == 200
