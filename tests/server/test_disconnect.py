"""Over real sockets (uvicorn in a thread over the real engine): the openai client works, and a client that
goes away gets its request aborted in the engine (seen through the engine's own counters)."""

import socket
import time

import httpx
import openai
import pytest

from .conftest import server_process
from .helpers import HELLO, is_idle, template_ids, token_counts, wait_until, wait_until_idle

# ~200 decode steps take far longer on CPU than a test waits: if the request is not aborted, it is still running.
LONG_RUN = {"messages": HELLO, "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def test_openai_client_round_trip(threaded_server, tokenizer):
    client = openai.OpenAI(base_url=threaded_server.api_url, api_key="unused", max_retries=0, timeout=60)
    completion = client.chat.completions.create(model="", messages=HELLO, temperature=0, max_tokens=16)
    assert completion.model == threaded_server.engine.model_name
    assert completion.choices[0].message.content and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == len(template_ids(tokenizer, HELLO))
    stream = client.chat.completions.create(model="", messages=HELLO, temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert token_counts(chunks[-1].usage) == token_counts(completion.usage)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=HELLO, n=0)
    assert info.value.body["param"] == "n"


def test_streaming_client_disconnect_aborts(threaded_server):
    engine = threaded_server.engine
    assert is_idle(wait_until_idle(engine))
    steps_before = engine.stats().num_steps
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", threaded_server.api_url + "/chat/completions",
                         json={**LONG_RUN, "stream": True}) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(3):  # the role chunk and two content chunks
                next(events)
            stats = engine.stats()
            assert stats.num_running == 1 and stats.kv_blocks_used > 0
    stats = wait_until_idle(engine)
    assert is_idle(stats), stats
    assert 2 <= stats.num_steps - steps_before < LONG_RUN["max_tokens"]  # it ran, and stopped early
    assert httpx.get(threaded_server.base_url + "/health").json()["num_running"] == 0


def test_non_streaming_client_disconnect_aborts(threaded_server):
    engine = threaded_server.engine
    assert is_idle(wait_until_idle(engine))
    steps_before = engine.stats().num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(threaded_server.api_url + "/chat/completions", json=LONG_RUN, timeout=1.5)
    stats = wait_until_idle(engine)
    assert is_idle(stats), stats
    assert 1 <= stats.num_steps - steps_before < LONG_RUN["max_tokens"]
    # the server still answers
    response = httpx.post(threaded_server.api_url + "/chat/completions",
                          json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: is_idle(engine.stats()))


def test_disconnect_mid_body_is_one_short_log_line():
    """A client that sends headers and part of its body, then leaves: one INFO line, no traceback."""
    with server_process("--log-level", "info") as (_, base, log):
        port = int(base.rsplit(":", 1)[1])
        lines_before = len(log.read_text().splitlines())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"messages\": [")
            time.sleep(0.3)  # the server is reading the body
        assert wait_until(lambda: "client disconnected" in log.read_text(), 10)
        time.sleep(0.5)
        new_lines = log.read_text().splitlines()[lines_before:]
        assert len(new_lines) == 1, new_lines
        assert " INFO " in new_lines[0] and "POST /v1/chat/completions" in new_lines[0]
        assert httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                          timeout=60).status_code == 200
