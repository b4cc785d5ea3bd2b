"""`nitro-torch serve --model ORG/NAME` and Nitro's loadmodel by name, as real server processes against the
loopback hub (HF_ENDPOINT) with a fresh HF_HOME: the first start downloads and serves, a later one serves from the
cache with the hub gone; loadmodel downloads off the event loop and switches, or fails and keeps the old model."""

from __future__ import annotations

import threading
import time

import httpx

from tests.hub_models import GATED, TINY
from tests.server.conftest import server_process

OPTIONS = ("--max-model-len", "256", "--kv-cache-memory", "0.05", "--max-num-seqs", "4", "--log-level", "info")
LOAD = "/inferences/llamacpp/loadmodel"


def chat(base_url: str) -> dict:
    response = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_first_start_downloads_and_serves_and_a_second_serves_from_the_cache_with_the_hub_gone(hub) -> None:
    with server_process("--model", TINY, *OPTIONS) as (_, base_url, log):
        assert chat(base_url)["model"] == TINY
        assert httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"] == TINY
        started = log.read_text()
        assert f"downloading {TINY} (" in started and f"downloaded {TINY} in " in started
    assert hub.downloads()
    hub.stop()

    with server_process("--model", TINY, *OPTIONS) as (_, base_url, log):
        assert chat(base_url)["model"] == TINY
        assert "downloading" not in log.read_text()


def test_loadmodel_by_name_downloads_without_blocking_and_switches_or_keeps_the_old_model(hub,
                                                                                         tiny_model_dir) -> None:
    with server_process("--model", tiny_model_dir, *OPTIONS) as (_, base_url, log):
        old = chat(base_url)["model"]
        for name, status, code in (("loopback/missing", 404, "model_not_found"), (GATED, 403, "model_gated")):
            failed = httpx.post(base_url + LOAD, json={"llama_model_path": name}, timeout=60)
            assert failed.status_code == status, failed.text
            error = failed.json()["error"]
            assert (error["code"], error["param"]) == (code, "llama_model_path")
            assert error["message"].endswith(f"The previous model '{old}' is still serving.")
        assert chat(base_url)["model"] == old

        hub.seconds_per_chunk = 0.02  # a download of a few seconds
        answer: dict[str, httpx.Response] = {}
        loading = threading.Thread(target=lambda: answer.update(
            response=httpx.post(base_url + LOAD, json={"llama_model_path": TINY}, timeout=300)))
        loading.start()
        deadline = time.monotonic() + 60
        while not hub.downloads() and time.monotonic() < deadline:
            time.sleep(0.05)
        latencies = []
        while not any(s.path.endswith("/config.json") for s in hub.downloads()):  # config.json comes last
            began = time.monotonic()
            assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - began)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(latencies) >= 5 and max(latencies) < 1.0, f"the event loop waited on the download: {latencies}"
        assert chat(base_url)["model"] == old  # the old model served through the download
        loading.join()
        loaded = answer["response"]
        assert loaded.status_code == 200, loaded.text
        assert (loaded.json()["model"], loaded.json()["previous_model"]) == (TINY, old)
        assert chat(base_url)["model"] == TINY
        assert "downloading loopback/tiny-llama" in log.read_text()
