"""`nitro-torch serve --tensor-parallel-size 2` on the CPU (gloo): the OpenAI client gets the single-process
server's answers and the start-up block says what each rank holds; a worker killed mid-stream ends that stream
with an error, /health turns 503 and new requests get 503 at once (no hang); SIGTERM leaves no worker behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import server_process
from .helpers import wait_until

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> str:
    from tests.tiny_models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tp-served"), smol_tokenizer, initializer_range=0.4))


def serve_options(model_dir: str, size: int) -> tuple[str, ...]:
    return ("--model", model_dir, "--device", "cpu", "--tensor-parallel-size", str(size), "--max-model-len", "1024",
            "--kv-cache-memory", "0.25")


def worker_pids(server_pid: int) -> list[int]:
    """The tensor-parallel workers under the server (children of its engine core's process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"nitro_torch.runner.parallel.worker" in command and _descends_from(parent, server_pid):
            pids.append(int(entry.name))
    return pids


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def greedy_answer(base_url: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.completion_tokens


def test_answers_equal_one_process_and_sigterm_leaves_no_worker(model_dir) -> None:
    with server_process(*serve_options(model_dir, 1)) as (_, base_url, _):
        expected = greedy_answer(base_url)
    with server_process(*serve_options(model_dir, 2)) as (process, base_url, log):
        assert greedy_answer(base_url) == expected
        text = log.read_text()
        assert "Parallel:    every layer split over 2 ranks" in text
        assert "rank 1 on cpu: weights" in text and "over 2 ranks)" in text
        workers = worker_pids(process.pid)
        assert len(workers) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 15)


def test_a_killed_worker_fails_requests_instead_of_hanging(model_dir) -> None:
    with server_process(*serve_options(model_dir, 2)) as (process, base_url, log):
        workers = worker_pids(process.pid)
        assert len(workers) == 1
        events: list[str] = []
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True}

        def stream() -> None:
            with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as response:
                events.extend(line for line in response.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=stream)
        reader.start()
        assert wait_until(lambda: len(events) > 3, 30)
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        reader.join(30)
        assert not reader.is_alive()
        assert time.monotonic() - killed < 15
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
        health = httpx.get(base_url + "/health", timeout=5)
        assert health.status_code == 503
        started = time.monotonic()
        chat = httpx.post(base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "engine_dead"
        assert time.monotonic() - started < 5
        assert process.poll() is None  # the server itself stays up and answers
        assert "tensor-parallel rank 1" in log.read_text()
