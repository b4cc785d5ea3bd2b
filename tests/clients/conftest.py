"""Fixtures of the official-client suites: the live `nitro-torch serve` subprocess on the real default model
(tests/server's `live_server`, reused) and the tiny tool model's server (tests/tool_fixtures.py, reused)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.server.conftest import RunningServer, live_server  # noqa: F401  (fixture)
from tests.tool_fixtures import (  # noqa: F401  (fixtures)
    tool_async_engine,
    tool_engine_config,
    tool_model_dir,
    tool_server_url,
)

CLIENT_TIMEOUT_S = 300.0


@pytest.fixture(scope="session")
def client(live_server: RunningServer) -> OpenAI:  # noqa: F811
    """The official Python client on the live server (no retries: a failure shows at once)."""
    return OpenAI(base_url=live_server.api_url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="session")
def tool_client(tool_server_url: str) -> OpenAI:  # noqa: F811
    """The official Python client on the tiny random-weight model whose chat template renders tools."""
    return OpenAI(base_url=tool_server_url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="session")
def served_name(client: OpenAI) -> str:
    [model] = client.models.list().data
    return model.id


@pytest.fixture(scope="session")
def http(live_server: RunningServer) -> Iterator[httpx.Client]:  # noqa: F811
    """Raw HTTP on the live server, for the routes the client has no method for (/tokenize, /detokenize)."""
    with httpx.Client(base_url=live_server.base_url, timeout=CLIENT_TIMEOUT_S) as raw:
        yield raw
