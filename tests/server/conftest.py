"""Fixtures: the real tokenizer, the real engine on the default model (in-process app, and uvicorn in a
thread over it), and a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from starlette.testclient import TestClient

from nitro_torch.config import Config, build_config

from .helpers import ENGINE_OPTIONS

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

LIVE_SERVER_START_TIMEOUT_S = 180.0
LIVE_MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def tokenizer():
    from nitro_torch.models.loader import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def engine_config() -> Config:
    return build_config(ENGINE_OPTIONS, env={})


@pytest.fixture(scope="session")
def real_engine(engine_config) -> Iterator[EngineClient]:
    """The real EngineClient on the default model (CPU), shared by the in-process servers of this session."""
    from nitro_torch.engine.client import start_engine_client

    engine = start_engine_client(engine_config)
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture
def own_engine() -> Iterator[EngineClient]:
    """A private engine (the served default, a small KV cache), for tests that stop or kill it."""
    from nitro_torch.engine.client import start_engine_client

    engine = start_engine_client(build_config({**ENGINE_OPTIONS, "kv_cache_memory": 0.1}, env={}))
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="session")
def thread_engine(engine_config) -> Iterator[EngineClient]:
    """The default model with its core in a thread of this process (`--engine-core thread`): for the tests that
    reach into the core to inject faults."""
    from nitro_torch.engine.client import start_engine_client

    engine = start_engine_client(engine_config, mode="thread")
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture
def thread_client(engine_config, thread_engine) -> Iterator[TestClient]:
    from nitro_torch.server.app import create_app

    with TestClient(create_app(engine_config, thread_engine), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def client(engine_config, real_engine) -> Iterator[TestClient]:
    from nitro_torch.server.app import create_app

    with TestClient(create_app(engine_config, real_engine), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def strict_client(real_engine) -> Iterator[TestClient]:
    """The real engine behind --strict-model-name: a `model` that is not a served name is 404."""
    from nitro_torch.server.app import create_app

    config = build_config({**ENGINE_OPTIONS, "strict_model_name": True}, env={})
    with TestClient(create_app(config, real_engine), raise_server_exceptions=False) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    engine: EngineClient | None = None

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` on uvicorn in a thread on a free loopback port (real sockets); yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "in-process server did not start"
        assert thread.is_alive(), "in-process server exited"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def private_server(**options: object) -> Iterator[RunningServer]:
    """uvicorn in a thread over a private engine of ENGINE_OPTIONS and `options` (shut down at exit)."""
    from nitro_torch.engine.client import start_engine_client
    from nitro_torch.server.app import create_app

    config = build_config({**ENGINE_OPTIONS, **options}, env={})
    engine = start_engine_client(config)
    try:
        with serving(create_app(config, engine)) as url:
            yield RunningServer(url, engine)
    finally:
        engine.shutdown()


@pytest.fixture
def threaded_server(engine_config, real_engine) -> Iterator[RunningServer]:
    """uvicorn in a thread over the real engine: real sockets, so client disconnects are real."""
    from nitro_torch.server.app import create_app

    with serving(create_app(engine_config, real_engine)) as url:
        yield RunningServer(url, real_engine)


@contextmanager
def server_process(*options: str, wait_healthy: bool = True,
                   preexec_fn: Callable[[], None] | None = None) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`nitro-torch serve` on a free port with `options`; yields (process, base URL, log file), once /health
    answers unless `wait_healthy` is False; stops it after (SIGTERM, then SIGKILL after 30 s)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="nitro-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "nitro_torch.cli", "serve", "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                               preexec_fn=preexec_fn)
    base_url = f"http://127.0.0.1:{port}"
    try:
        if wait_healthy:
            _wait_until_healthy(process, base_url, Path(log.name))
        yield process, base_url, Path(log.name)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def live_server() -> Iterator[RunningServer]:
    """`nitro-torch serve` as a subprocess on the real default model."""
    with server_process("--max-num-seqs", "32", "--max-model-len", str(LIVE_MAX_MODEL_LEN),
                        "--log-level", "warning") as (_, base_url, _):
        yield RunningServer(base_url)


def _wait_until_healthy(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + LIVE_SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {LIVE_SERVER_START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")
