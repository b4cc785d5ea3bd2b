"""Fixtures for the tool tests: a tiny random-weight model whose chat template supports tools, and the tools
they call. Import the fixtures into a test module to use them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from nitro_torch.config import build_config
from tests.server.conftest import serving

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        # Enums, booleans and short strings: a random-weight model must finish the arguments within a few tokens.
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "detailed": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.", "parameters": WEATHER_PARAMETERS}}
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARAMETERS_BY_NAME = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
TOOL_ENGINE_OPTIONS = {"device": "cpu", "max_num_seqs": 8, "max_model_len": 2048}


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random-weight Llama with SmolLM2's tokenizer and a Hermes-style template that renders tools."""
    from tests.tiny_models import save_tiny_model
    from tests.tool_templates import HERMES_TOOL_TEMPLATE

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-tools"), smol_tokenizer,
                               chat_template=HERMES_TOOL_TEMPLATE))


@pytest.fixture(scope="session")
def tool_engine_config(tool_model_dir):
    return build_config({"model": tool_model_dir, **TOOL_ENGINE_OPTIONS}, env={})


@pytest.fixture(scope="session")
def tool_async_engine(tool_engine_config) -> Iterator[Any]:
    from nitro_torch.engine.client import start_engine_client

    engine = start_engine_client(tool_engine_config)
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="session")
def tool_server_url(tool_engine_config, tool_async_engine) -> Iterator[str]:
    """uvicorn in a thread over the tool model's engine; yields the API base URL (…/v1)."""
    from nitro_torch.server.app import create_app

    with serving(create_app(tool_engine_config, tool_async_engine)) as url:
        yield url + "/v1"


def assemble_streamed_calls(stream: Any) -> tuple[str, list[str], dict[int, dict[str, Any]]]:
    """(content, finish reasons, calls by index) of a streamed chat completion, as a client puts them together."""
    calls: dict[int, dict[str, Any]] = {}
    content, finish_reasons = "", []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return content, finish_reasons, calls
