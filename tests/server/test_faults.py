"""A request whose inference fails (here: NaN logits injected into its rows only) gets a 500 OpenAI error, or
an error event in its stream; requests beside it and after it are served normally."""

from __future__ import annotations

import json
import threading

import pytest

VICTIM_SEED = 4242


@pytest.fixture
def poisoned(thread_engine, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """NaN logits for every request sent with seed VICTIM_SEED (the core runs in a thread here, to be reached)."""
    runner = thread_engine.core.runner
    execute = runner.execute

    def poisoned_execute(plan, previous=None):  # noqa: ANN001, ANN202
        logits, requests = execute(plan, previous)
        rows = [i for i, r in enumerate(requests) if r.params.seed == VICTIM_SEED]
        if logits is not None and rows:
            logits = logits.clone()
            logits[rows] = float("nan")
        return logits, requests

    monkeypatch.setattr(runner, "execute", poisoned_execute)


def chat(seed: int | None = None, stream: bool = False, max_tokens: int = 4) -> dict:
    body = {"model": "", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if seed is not None:
        body["seed"] = seed
    return body


def test_failed_request_is_a_500_and_the_server_goes_on(thread_client, poisoned) -> None:  # noqa: ANN001
    failed = thread_client.post("/v1/chat/completions", json=chat(VICTIM_SEED))
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "server_error" and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in failed.text and "/" not in error["message"]

    ok = thread_client.post("/v1/chat/completions", json=chat())
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_failed_stream_ends_with_an_error_event(thread_client, poisoned) -> None:  # noqa: ANN001
    with thread_client.stream("POST", "/v1/chat/completions", json=chat(VICTIM_SEED, stream=True)) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"


def test_only_the_failed_request_of_a_batch_fails(thread_client, poisoned) -> None:  # noqa: ANN001
    results: dict[str, object] = {}

    def send(name: str, seed: int | None) -> None:
        response = thread_client.post("/v1/chat/completions", json=chat(seed, max_tokens=24))
        results[name] = (response.status_code, response.json())

    threads = [threading.Thread(target=send, args=(f"ok{i}", None)) for i in range(3)]
    threads.append(threading.Thread(target=send, args=("victim", VICTIM_SEED)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results["victim"][0] == 500
    for i in range(3):
        status, body = results[f"ok{i}"]
        assert status == 200 and body["usage"]["completion_tokens"] > 0


def test_a_fatal_device_error_fails_requests_and_turns_health_503(tiny_model_dir) -> None:  # noqa: ANN001
    """A CUDA error poisons the device: in-flight requests get an error at once and /health answers 503 so
    the orchestrator restarts the pod."""
    import torch
    from starlette.testclient import TestClient

    from nitro_torch.config import build_config
    from nitro_torch.engine.client import start_engine_client
    from nitro_torch.server.app import create_app

    config = build_config({"model": tiny_model_dir, "device": "cpu", "num_kv_blocks": 64}, env={})
    engine = start_engine_client(config, mode="thread")
    try:
        with TestClient(create_app(config, engine), raise_server_exceptions=False) as client:
            assert client.get("/health").status_code == 200

            def illegal_address(plan, previous=None):  # noqa: ANN001, ANN202
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")

            engine.core.runner.execute = illegal_address
            failed = client.post("/v1/chat/completions", json=chat(max_tokens=8))
            assert failed.status_code in (500, 503)
            assert failed.json()["error"]["type"] == "server_error"
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    finally:
        engine.shutdown()
