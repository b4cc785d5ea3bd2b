"""A fair share for every client: the per-request token cap, min_tokens within reach, and a light client's chat
beside a heavy client's n=64 job (real server, real sockets from two addresses, the official OpenAI client)."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import httpx
import openai
import pytest

from nitro_torch.server.chat.request_budget import check_request_budget, max_request_tokens

from .conftest import serving
from .helpers import HELLO, wait_until, wait_until_idle

LIGHT_ADDRESS = "127.0.0.2"  # any 127/8 address reaches loopback: a second client, as the server sees it


def light_client(base_url: str) -> openai.OpenAI:
    transport = httpx.HTTPTransport(local_address=LIGHT_ADDRESS)
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0,
                         http_client=httpx.Client(transport=transport, timeout=120))


def test_the_budget_counts_every_choice_and_an_unset_max_tokens_as_the_rest_of_the_window() -> None:
    check_request_budget([100], 4, None, 0, 2048, 4 * 2048)  # four full windows: the default limit
    with pytest.raises(Exception, match="up to 10240 tokens .*limit of 8192"):
        check_request_budget([100], 5, None, 0, 2048, 4 * 2048)
    with pytest.raises(Exception, match="up to 454144 tokens"):
        check_request_budget([3000], 64, 4096, 0, 8192, 4 * 8192)
    check_request_budget([3000], 64, 4096, 0, 8192, None)
    assert max_request_tokens(None, 2048) == 8192 and max_request_tokens(0, 2048) is None
    assert max_request_tokens(100, 2048) == 100


def test_a_request_over_the_token_cap_is_400_with_the_limit(client) -> None:
    body = {"messages": HELLO, "n": 64, "max_tokens": 2000, "ignore_eos": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["param"] == "max_tokens"
    assert "limit of 8192 tokens" in error["message"]
    response = client.post("/v1/completions", json={"prompt": "Hi", "n": 8, "max_tokens": None})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body", [{"min_tokens": 10**9, "max_tokens": None}, {"min_tokens": 2040}])
def test_min_tokens_beyond_what_can_be_generated_is_400(client, body) -> None:
    response = client.post("/v1/chat/completions", json={"messages": HELLO, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "min_tokens" and "can be generated" in error["message"]


def light_latency(client: openai.OpenAI, tries: int = 5) -> float:
    """Median seconds of a short greedy chat."""
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        answer = client.chat.completions.create(model="", messages=HELLO, max_tokens=4, temperature=0,
                                                extra_body={"ignore_eos": True})
        times.append(time.perf_counter() - start)
        assert answer.usage.completion_tokens == 4
    return statistics.median(times)


def test_a_light_clients_chat_stays_within_2x_of_idle_while_a_heavy_client_runs_n64(engine_config, real_engine) -> None:
    from nitro_torch.server.app import create_app

    config = dataclasses.replace(engine_config, server=dataclasses.replace(engine_config.server,
                                                                          max_request_tokens=0))
    assert config.scheduler.fair_share
    with serving(create_app(config, real_engine)) as base_url:
        light = light_client(base_url)
        light_latency(light, tries=1)  # warm
        idle = light_latency(light)
        heavy_body = {"model": "", "messages": [{"role": "user", "content": "Write a very long story."}], "n": 64,
                      "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}
        stop = threading.Event()
        received = []

        def heavy() -> None:
            with httpx.Client(timeout=300) as http, http.stream("POST", base_url + "/v1/chat/completions",
                                                                json=heavy_body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    received.append(line)
                    if stop.is_set():
                        return  # leaving the stream aborts all 64 choices

        thread = threading.Thread(target=heavy, daemon=True)
        thread.start()
        try:
            assert wait_until(lambda: real_engine.stats().num_running >= 12, timeout_s=60)
            loaded = light_latency(light)
            assert real_engine.stats().num_running >= 12  # the heavy job ran all along
        finally:
            stop.set()
            thread.join(timeout=60)
        print(f"light chat: idle {idle * 1000:.0f} ms, beside n=64 {loaded * 1000:.0f} ms ({loaded / idle:.2f}x)")
        assert loaded <= 2 * idle, f"idle {idle:.3f} s, beside the heavy job {loaded:.3f} s"
        assert len(received) > 100
        stats = wait_until_idle(real_engine, timeout_s=60)
        assert stats.num_running == 0 and stats.kv_blocks_used == 0
