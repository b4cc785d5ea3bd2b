"""Nitro's routes and switching models while the server stays up: a real uvicorn server over its own
ModelHost (the default model, then a tiny random-weight model), since these tests unload what they serve."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from starlette.testclient import TestClient

from nitro_torch.config import build_config
from nitro_torch.models.embedded import DEFAULT_MODEL_NAME
from nitro_torch.server import model_host
from nitro_torch.server.app import create_app
from nitro_torch.server.model_host import HostState, ModelHost
from nitro_torch.server.nitro import api as nitro_api

from .conftest import serving
from .helpers import ENGINE_OPTIONS, HELLO, wait_until

LOAD = "/inferences/llamacpp/loadmodel"
UNLOAD = "/inferences/llamacpp/unloadmodel"
STATUS = "/inferences/llamacpp/modelstatus"
NITRO_CHAT = "/inferences/llamacpp/chat_completion"
GREEDY = {"model": "", "messages": HELLO, "temperature": 0, "max_tokens": 4}
OPTIONS = {**ENGINE_OPTIONS, "kv_cache_memory": 0.1}


@dataclass
class Server:
    url: str
    host: ModelHost

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120)


@pytest.fixture
def server() -> Iterator[Server]:
    """The default model on a host of its own, served by uvicorn in a thread."""
    from nitro_torch.engine.client import start_engine_client

    config = build_config(OPTIONS, env={})
    host = ModelHost(config, drain_timeout_s=120)
    host.install(start_engine_client(config), config, owned=True)
    try:
        with serving(create_app(config, host=host)) as url:
            yield Server(url, host)
    finally:
        host.close()


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def assert_serving(server: Server, name: str) -> None:
    status = server.get(STATUS).json()
    assert status["model_loaded"] is True and status["model"] == name
    assert json.loads(status["model_data"])["model"] == name  # Nitro's model_data: a JSON string
    assert [card["id"] for card in server.get("/v1/models").json()["data"]] == [name]
    reply = server.post("/v1/chat/completions", GREEDY)
    assert reply.status_code == 200 and reply.json()["model"] == name


def test_load_chat_status_and_unload(server, tiny_model_dir):
    assert_serving(server, DEFAULT_MODEL_NAME)
    loaded = server.post("/inferences/llamacpp/loadModel", {  # Nitro's paths ignore case
        "llama_model_path": tiny_model_dir, "ctx_len": 512, "n_parallel": 4, "cont_batching": True,
        "embedding": False, "cpu_threads": torch.get_num_threads(), "ngl": 100, "n_batch": 512, "mmproj": None,
    })
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    tiny = Path(tiny_model_dir).name
    assert body["message"] == "Model loaded successfully" and body["model"] == tiny
    assert body["previous_model"] == DEFAULT_MODEL_NAME
    assert (body["ctx_len"], body["n_parallel"], body["cont_batching"], body["embedding"]) == (512, 4, True, False)
    assert body["ignored_options"] == ["mmproj", "n_batch", "ngl"]
    assert_serving(server, tiny)
    assert server.get("/v1/models").json()["data"][0]["max_model_len"] == 512

    nitro = server.post(NITRO_CHAT, GREEDY).json()
    openai = server.post("/v1/chat/completions", GREEDY).json()
    assert nitro["model"] == openai["model"] == tiny
    assert nitro["choices"][0]["message"] == openai["choices"][0]["message"]  # greedy: the same answer
    assert nitro["choices"][0]["finish_reason"] == "length"  # OpenAI's, not Nitro's null
    assert_error(server.post("/inferences/llamacpp/embedding", {"input": "hi"}), 400, "embeddings_disabled",
                 param="embedding")

    assert server.get(UNLOAD).json() == {"message": "Model unloaded successfully", "model": tiny}
    assert server.host.engine is None and server.host.state == HostState.EMPTY
    assert_error(server.get(UNLOAD), 409, "model_not_loaded")
    assert_error(server.get(STATUS), 409, "model_not_loaded")
    for path in ("/v1/chat/completions", NITRO_CHAT):
        assert_error(server.post(path, GREEDY), 503, "model_not_loaded")
    assert server.get("/health").json() == {"status": "ok", "state": "empty", "model_loaded": False}  # alive
    assert_error(server.get("/ready"), 503, "model_not_loaded")
    assert server.get("/v1/models").json() == {"object": "list", "data": []}
    healthz = server.get("/healthz")
    assert healthz.status_code == 200 and healthz.json()["model_loaded"] is False

    reloaded = server.post(LOAD, {"model": "default"})  # Nitro's `model` field works as well
    assert reloaded.status_code == 200 and reloaded.json()["previous_model"] is None
    assert_serving(server, DEFAULT_MODEL_NAME)


def not_a_causal_lm(folder: Path, tiny_model_dir: str) -> Path:
    """A tokenizer that loads, with a vision-encoder config that AutoModelForCausalLM refuses."""
    from transformers import ViTConfig

    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    return folder


def test_failed_loads_keep_the_previous_model(server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name the cache lacks is not looked up (test_serve_hub_model.py)
    missing = str(tmp_path / "missing.gguf")
    error = assert_error(server.post(LOAD, {"llama_model_path": missing}), 404, "model_not_found",
                         param="llama_model_path")
    assert missing in error["message"] and f"'{DEFAULT_MODEL_NAME}' is still serving" in error["message"]
    error = assert_error(server.post(LOAD, {"model": "someorg/not-in-the-cache"}), 404, "model_not_found",
                         param="model")
    assert ".cache" not in error["message"]  # the server's own paths stay in its log
    assert_error(server.post(LOAD, {"llama_model_path": str(tmp_path)}), 400, "invalid_model")
    vit = str(not_a_causal_lm(tmp_path / "vit", tiny_model_dir))
    error = assert_error(server.post(LOAD, {"llama_model_path": vit}), 400, "unsupported_model")
    assert "not a causal language model" in error["message"] and "ViTConfig" in error["message"]
    assert_error(server.post(LOAD, {"llama_model_path": tiny_model_dir, "ctx_len": 99_999}), 400, "invalid_value",
                 param="ctx_len")
    for body, param in [({}, "llama_model_path"), ({"llama_model_path": 5}, "llama_model_path"),
                        ({"model": ""}, "model"), ({"model": "a\x00b"}, "model"),
                        ({"model": tiny_model_dir, "ctx_len": "2048"}, "ctx_len"),
                        ({"model": tiny_model_dir, "n_parallel": 0}, "n_parallel"),
                        ({"model": tiny_model_dir, "embedding": "yes"}, "embedding"),
                        ({"model": tiny_model_dir, "cpu_threads": True}, "cpu_threads"),
                        ({"model": tiny_model_dir, "user_prompt": ["x"]}, "user_prompt")]:
        assert server.post(LOAD, body).json()["error"]["param"] == param, body
    broken = httpx.post(server.url + LOAD, content=b"{", timeout=30)
    assert_error(broken, 400, "invalid_json")
    assert_serving(server, DEFAULT_MODEL_NAME)
    assert server.host.state == HostState.READY


def stream_chat(url: str, max_tokens: int, started: threading.Event, results: list) -> None:
    body = {**GREEDY, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if '"content":"' in line and '"content":""' not in line:
                    started.set()
    results.append((response.status_code, events))


class FrozenCore:
    """Holds the serving engine's core between steps while cleared: its process is stopped (SIGSTOP) and
    continued (SIGCONT) on set(), as an operator could."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def clear(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def set(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # the core has ended (the switch shut it down)


@contextmanager
def frozen_between_steps(server: Server) -> Iterator[FrozenCore]:
    gate = FrozenCore(server.host.engine.pid)
    try:
        yield gate
    finally:
        gate.set()


def test_switch_drains_streams_and_turns_new_requests_away(server, tiny_model_dir):
    max_tokens, streams = 32, []
    results: list = []
    with frozen_between_steps(server) as gate:
        for _ in range(3):
            started = threading.Event()
            thread = threading.Thread(target=stream_chat, args=(server.url, max_tokens, started, results),
                                      daemon=True)
            thread.start()
            streams.append((thread, started))
        assert all(started.wait(120) for _, started in streams)
        gate.clear()  # the three streams stay in flight until the checks below are done
        load_result: list[httpx.Response] = []
        loader = threading.Thread(target=lambda: load_result.append(server.post(LOAD, {"model": tiny_model_dir})))
        loader.start()
        assert wait_until(lambda: server.host.state == HostState.SWITCHING, 120)
        assert server.host.in_flight == 3 and not results  # the switch waits for them

        turned_away = server.post("/v1/chat/completions", GREEDY)
        assert_error(turned_away, 503, "model_switching")
        assert int(turned_away.headers["retry-after"]) > 0
        assert_error(server.post(LOAD, {"model": tiny_model_dir}), 409, "load_in_progress")
        assert_error(server.get(UNLOAD), 409, "load_in_progress")
        assert_error(server.get(STATUS), 503, "model_switching")
        liveness = server.get("/health")  # a long switch must not get the pod restarted...
        assert liveness.status_code == 200, liveness.text
        assert liveness.json()["state"] == "switching" and liveness.json()["model_loaded"] is True
        assert_error(server.get("/ready"), 503, "model_switching")  # ...only taken out of the Service
        assert server.get("/healthz").status_code == 200

        gate.set()
    loader.join(timeout=300)
    assert load_result and load_result[0].status_code == 200, load_result
    assert load_result[0].json()["previous_model"] == DEFAULT_MODEL_NAME
    for thread, _ in streams:
        thread.join(timeout=60)
    assert len(results) == 3
    for status, events in results:  # every stream finished on the old model, none cut off
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert all("error" not in chunk for chunk in chunks)
        assert {chunk["model"] for chunk in chunks} == {DEFAULT_MODEL_NAME}
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
    assert_serving(server, Path(tiny_model_dir).name)


def test_a_model_that_fails_to_start_brings_the_previous_one_back(server, tiny_model_dir, monkeypatch):
    async def failing_warm_up(engine) -> None:
        raise RuntimeError("forward pass failed")

    monkeypatch.setattr(model_host, "warm_up", failing_warm_up)
    error = assert_error(server.post(LOAD, {"model": tiny_model_dir}), 500, "model_load_failed")
    assert "RuntimeError" in error["message"] and "was reloaded and is serving" in error["message"]
    assert_serving(server, DEFAULT_MODEL_NAME)


def test_a_switch_that_loses_the_model_fails_liveness(server, tiny_model_dir, monkeypatch):
    """Neither the new model nor the previous one starts: no model is loaded though none was unloaded, so
    /health is 503 (a restart brings the start-up model back); a load that works makes it 200 again."""
    async def failing_warm_up(engine) -> None:
        raise RuntimeError("forward pass failed")

    def failing_restore(config):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model_host, "warm_up", failing_warm_up)
    monkeypatch.setattr(model_host, "start_engine_client", failing_restore)
    error = assert_error(server.post(LOAD, {"model": tiny_model_dir}), 500, "model_load_failed")
    assert "No model is loaded now" in error["message"]
    assert_error(server.get("/health"), 503, "model_lost")
    assert_error(server.get("/ready"), 503, "model_not_loaded")
    monkeypatch.undo()
    assert server.post(LOAD, {"model": tiny_model_dir}).status_code == 200
    assert server.get("/health").status_code == 200 and server.get("/ready").status_code == 200


def test_loadmodel_numbers_are_bounded(server, tiny_model_dir):
    """n_parallel above the server's --max-num-seqs would lift the 429 bound (requests wait only once every
    running slot is taken); the other numbers have sane ranges too. Each is a 400 naming the field, before
    anything is loaded."""
    ceiling = server.host.base_config.scheduler.max_num_seqs
    cpus = os.cpu_count() or 1
    for field, value in [("n_parallel", 65_536), ("n_parallel", ceiling + 1), ("n_parallel", 0),
                         ("ctx_len", nitro_api.MIN_CTX_LEN - 1), ("ctx_len", nitro_api.MAX_CTX_LEN + 1),
                         ("ctx_len", 10**30), ("cpu_threads", cpus + 1), ("cpu_threads", 0)]:
        error = assert_error(server.post(LOAD, {"model": tiny_model_dir, field: value}), 400, "invalid_value",
                             param=field)
        assert field in error["message"], error
    assert str(ceiling) in server.post(LOAD, {"model": tiny_model_dir, "n_parallel": 65_536}).json()["error"]["message"]
    assert_serving(server, DEFAULT_MODEL_NAME)
    at_bounds = server.post(LOAD, {"model": tiny_model_dir, "n_parallel": ceiling, "ctx_len": nitro_api.MIN_CTX_LEN,
                                   "cpu_threads": cpus})
    assert at_bounds.status_code == 200, at_bounds.text
    assert (at_bounds.json()["n_parallel"], at_bounds.json()["ctx_len"]) == (ceiling, nitro_api.MIN_CTX_LEN)
    assert at_bounds.json()["prompt_template"] is None  # only the prompts, not the server's chat policy


def test_starting_without_a_model(tiny_model_dir, monkeypatch):
    config = build_config({**OPTIONS, "model": "none"}, env={})
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        assert client.app.state.host.engine is None
        assert client.get("/healthz").json()["model_loaded"] is False
        assert client.post("/v1/chat/completions", json=GREEDY).json()["error"]["code"] == "model_not_loaded"
        assert client.get("/v1/models").json()["data"] == []
        assert client.post(LOAD, json={"model": tiny_model_dir, "pre_prompt": "Be brief."}).status_code == 200
        status = client.post(STATUS).json()  # Cortex clients POST it
        assert json.loads(status["model_data"])["prompt_template"] == {"pre_prompt": "Be brief."}
        assert client.post(NITRO_CHAT, json=GREEDY).status_code == 200

    import uvicorn

    from nitro_torch.cli import main

    started: list = []

    def run_without_serving(server: uvicorn.Server) -> None:
        started.append(server.config.app.state.host.engine)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run_without_serving)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # leave the test process's logging alone
    assert main(["serve", "--model", "none", "--device", "cpu"]) == 0
    assert started == [None]


def test_switch_waits_for_leases_then_times_out(tiny_model_dir):
    """The host on its own: a lease held past the drain timeout does not block the switch forever."""
    import asyncio

    from nitro_torch.engine.client import start_engine_client

    config = build_config({**OPTIONS, "model": tiny_model_dir}, env={})
    host = ModelHost(config, drain_timeout_s=0.5)
    host.install(start_engine_client(config), config, owned=True)
    lease = host.acquire()

    async def scenario() -> float:
        started = time.monotonic()
        await host.load(config)
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) >= 0.5
        assert host.engine is not lease.engine and not lease.engine.is_alive and host.in_flight == 0
        lease.release()  # a late release touches only the retired engine's count
        assert host.in_flight == 0 and host.state == HostState.READY
    finally:
        host.close()
