"""The engine boundary itself, with the served default (the core in a process of its own): the core runs in
another process, dies loudly (every in-flight request gets an error, /health 503, never a hang), and a client
that reads slowly holds back nobody else."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from nitro_torch.config import build_config
from nitro_torch.engine.client import EngineDeadError
from nitro_torch.engine.messages import (
    CoreOutput,
    CoreOutputs,
    EngineCoreRequest,
    EngineStats,
    decode_input,
    decode_message,
    encode,
)
from nitro_torch.engine.outputs import FinishReason, TokenLogprob
from nitro_torch.sampling import GuidedDecoding, SamplingParams

from .conftest import serving
from .helpers import ENGINE_OPTIONS, HELLO, wait_until, wait_until_idle

LONG = {"model": "", "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def test_messages_cross_as_plain_data() -> None:
    request = EngineCoreRequest("r", [1, 2, 3], SamplingParams(max_tokens=5, stop=["x"], logit_bias={7: -1.5},
                                                               guided=GuidedDecoding("regex", "a+")), "parent")
    assert decode_input(encode(request)) == request
    outputs = CoreOutputs([CoreOutput("r", [9], FinishReason.STOP, True, 16, [TokenLogprob(9, -0.5, [(9, -0.5)])],
                                      None, 12.5)], EngineStats(num_running=1, kv_blocks_total=8), 3)
    assert decode_message(encode(outputs)) == outputs


def test_the_core_runs_in_its_own_process(own_engine) -> None:
    assert own_engine.pid is not None and own_engine.pid != os.getpid()
    os.kill(own_engine.pid, 0)  # alive
    assert own_engine.info.kv_blocks_total == own_engine.stats().kv_blocks_total > 0
    pid = own_engine.pid
    own_engine.shutdown()
    assert wait_until(lambda: not _alive(pid), 30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers signal 0
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_killing_the_core_fails_every_request_and_health_turns_503(own_engine) -> None:
    from nitro_torch.server.app import create_app

    config = build_config(ENGINE_OPTIONS, env={})
    with serving(create_app(config, own_engine)) as url:
        assert httpx.get(url + "/health").status_code == 200
        events: list[str] = []
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json={**LONG, "stream": True},
                              timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        if len(events) >= 3:
                            streaming.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert streaming.wait(120)
        killed_at = time.monotonic()
        os.kill(own_engine.pid, signal.SIGKILL)
        reader.join(timeout=30)
        assert not reader.is_alive(), "the stream hung after the core died"
        assert time.monotonic() - killed_at < 10
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "server_error"  # an error event, not a silent end

        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        refused = httpx.post(url + "/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        assert httpx.get(url + "/healthz").status_code == 200  # the server itself is up
    assert not own_engine.is_alive
    with pytest.raises(EngineDeadError):
        import asyncio

        async def late() -> None:
            async for _ in own_engine.generate("late", [1, 2, 3], SamplingParams(max_tokens=2)):
                pass

        asyncio.run(late())


def test_a_slow_reader_holds_back_nobody(own_engine) -> None:
    """A stream nobody reads for a while: the core goes on stepping, other requests finish, and the slow
    client still gets every token once it reads."""
    from nitro_torch.server.app import create_app

    config = build_config(ENGINE_OPTIONS, env={})
    with serving(create_app(config, own_engine)) as url:
        with httpx.Client(timeout=120) as slow_client, slow_client.stream(
                "POST", url + "/v1/chat/completions",
                json={**LONG, "max_tokens": 200, "stream": True, "stream_options": {"include_usage": True}}) as slow:
            lines = slow.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "assistant" in first
            quick = [httpx.post(url + "/v1/chat/completions", json={**LONG, "max_tokens": 8}, timeout=120)
                     for _ in range(3)]
            assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8 for r in quick)
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            # the core went on stepping with nobody reading: the slow request finished there before a byte was read
            assert wait_until(lambda: own_engine.stats().num_running == 0, 120)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 200
    assert wait_until_idle(own_engine).kv_blocks_used == 0



def test_asynchronous_scheduling_in_the_core_process_serves_the_same_answers(client) -> None:  # noqa: ANN001
    """--async-scheduling in the served layout (the core in its own process): greedy chats, n=2 forks, a stream and
    a penalty (whose steps run in step) answer exactly as the default engine does."""
    from starlette.testclient import TestClient

    from nitro_torch.engine.client import start_engine_client
    from nitro_torch.server.app import create_app

    bodies = [
        {"messages": HELLO, "max_tokens": 24, "temperature": 0, "n": 2},
        {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 20, "temperature": 0,
         "frequency_penalty": 0.8},
        {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 30, "temperature": 0},
    ]
    expected = [client.post("/v1/chat/completions", json=body).json()["choices"] for body in bodies]
    config = build_config({**ENGINE_OPTIONS, "kv_cache_memory": 0.1, "async_scheduling": True}, env={})
    engine = start_engine_client(config)
    try:
        with TestClient(create_app(config, engine)) as overlapped:
            for body, choices in zip(bodies, expected):
                got = overlapped.post("/v1/chat/completions", json=body).json()["choices"]
                assert [c["message"]["content"] for c in got] == [c["message"]["content"] for c in choices]
                assert [c["finish_reason"] for c in got] == [c["finish_reason"] for c in choices]
            lines = [line for line in overlapped.post("/v1/chat/completions", json={**bodies[2], "stream": True}
                                                      ).text.splitlines() if line]
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in lines if line.startswith("data: {"))
            assert text == expected[2][0]["message"]["content"] and lines[-1] == "data: [DONE]"
            idle = wait_until_idle(engine)
            assert idle.num_running == 0 and idle.kv_blocks_used == 0
    finally:
        engine.shutdown()
