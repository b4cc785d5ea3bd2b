"""The official `anthropic` Python client against `nitro-torch serve` on the real default model: messages.create,
messages.stream, tool use, count_tokens, errors and the API key. Greedy answers are compared with each other,
never with fixed text. (This client version has no `temperature` argument: it travels in `extra_body`.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic import Anthropic
from anthropic.types import Message, TextBlock, ToolUseBlock

from tests.server.conftest import LIVE_MAX_MODEL_LEN, RunningServer, server_process

from .conftest import CLIENT_TIMEOUT_S

pytestmark = pytest.mark.slow

MODEL = "claude-sonnet-4-5"
"""Any name is answered by the served model."""
HELLO: list[Any] = [{"role": "user", "content": "Hello"}]
GREEDY = {"temperature": 0}
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: Any = {"name": "get_weather", "description": "Current weather in a city.",
                     "input_schema": WEATHER_SCHEMA}
KEY = "sk-ant-live-0123456789"


@pytest.fixture(scope="module")
def claude(live_server: RunningServer) -> Anthropic:
    return Anthropic(base_url=live_server.base_url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def served_model(live_server: RunningServer) -> str:
    return httpx.get(live_server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]


def create(client: Anthropic, messages: list[Any] = HELLO, max_tokens: int = 24, **fields: Any) -> Message:
    return client.messages.create(model=MODEL, max_tokens=max_tokens, messages=messages, extra_body=GREEDY,
                                  **fields)


def text_of(message: Message) -> str:
    [block] = message.content
    assert isinstance(block, TextBlock)
    return block.text


# ---- messages.create ---------------------------------------------------------------------------------------------


def test_create_with_system(claude, served_model):
    system = "You are a pirate. Answer in one sentence."
    reply = create(claude, system=system)
    assert isinstance(reply, Message) and reply.id.startswith("msg_") and reply.role == "assistant"
    assert reply.model == served_model
    assert text_of(reply) and reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert 1 <= reply.usage.output_tokens <= 24
    assert text_of(reply) != text_of(create(claude, system="You are a calculator."))
    counted = claude.messages.count_tokens(model=MODEL, system=system, messages=HELLO).input_tokens
    longer = claude.messages.count_tokens(model=MODEL, system=system + " Be kind.", messages=HELLO).input_tokens
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) == counted < longer


def test_max_tokens_is_stop_reason_max_tokens(claude):
    reply = create(claude, max_tokens=2)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 2


def test_stop_sequences(claude):
    text = text_of(create(claude))
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    reply = create(claude, stop_sequences=["never-generated", stop])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    assert text_of(reply) == text[:text.index(stop)]


def test_count_tokens_equals_usage_input_tokens(claude):
    # A new system prompt at the start: nothing of it is in the prefix cache yet.
    fields: dict[str, Any] = {"system": f"Session {uuid.uuid4().hex}. Be brief.", "messages": HELLO}
    counted = claude.messages.count_tokens(model=MODEL, **fields).input_tokens
    first = create(claude, max_tokens=4, **fields)
    assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens == counted
    # Again: as Anthropic counts, the prompt tokens read from the (prefix) cache are not in input_tokens.
    again = create(claude, max_tokens=4, **fields)
    assert again.usage.cache_read_input_tokens and again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == counted
    with_tools = claude.messages.count_tokens(model=MODEL, tools=[WEATHER_TOOL], **fields).input_tokens
    assert with_tools > counted  # the tools are in the prompt


# ---- messages.stream ---------------------------------------------------------------------------------------------


def test_stream_text_joins_to_the_final_message(claude):
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=HELLO, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(final)
    assert text_of(final) == text_of(create(claude))  # the same greedy answer as without streaming
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens >= 1


def test_stream_event_order_and_stop_sequence(claude):
    text = text_of(create(claude))
    stop = " " + text.split()[1]
    raw = claude.messages.create(model=MODEL, max_tokens=24, messages=HELLO, stop_sequences=[stop], stream=True,
                                 extra_body=GREEDY)
    kinds = [event.type for event in raw]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta"}
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=HELLO, stop_sequences=[stop],
                                extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert text_of(final) == text[:text.index(stop)]


# ---- tools -------------------------------------------------------------------------------------------------------


def test_tool_use_round_trip(claude):
    question: list[Any] = [{"role": "user", "content": "What is the weather in Tokyo, in celsius?"}]
    reply = create(claude, question, max_tokens=200, tools=[WEATHER_TOOL],
                   tool_choice={"type": "tool", "name": "get_weather"})
    assert reply.stop_reason == "tool_use"
    [call] = [block for block in reply.content if isinstance(block, ToolUseBlock)]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER_SCHEMA)
    conversation = [*question, reply.to_param(),
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": "18 degrees and sunny"}]}]
    answer = create(claude, conversation, max_tokens=24, tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer)
    counted = claude.messages.count_tokens(model=MODEL, messages=conversation, tools=[WEATHER_TOOL],
                                           tool_choice={"type": "none"}).input_tokens
    assert answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0) == counted


def test_streamed_tool_use_is_parsed_by_the_client(claude):
    with claude.messages.stream(model=MODEL, max_tokens=200, extra_body=GREEDY, tools=[WEATHER_TOOL],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                messages=[{"role": "user", "content": "Weather in Lima?"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # the client's own event for input_json_delta
    [call] = final.content
    assert isinstance(call, ToolUseBlock) and final.stop_reason == "tool_use"
    jsonschema.validate(call.input, WEATHER_SCHEMA)


# ---- errors and the API key ----------------------------------------------------------------------------------


def test_an_image_block_is_a_bad_request(claude):
    image: Any = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    with pytest.raises(anthropic.BadRequestError) as info:
        create(claude, [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert info.value.status_code == 400
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert info.value.body["error"]["message"].startswith("messages.0.content.1: this model does not accept images")


def test_thinking_is_a_bad_request(claude):
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        create(claude, max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024})


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    with server_process("--api-key", KEY, "--max-model-len", str(LIVE_MAX_MODEL_LEN), "--max-num-seqs", "4",
                        "--log-level", "warning") as (_, base_url, _):
        yield base_url


def test_api_key_as_x_api_key_or_bearer(keyed_server):
    for client in (Anthropic(base_url=keyed_server, api_key=KEY, max_retries=0),  # sends x-api-key
                   Anthropic(base_url=keyed_server, api_key=None, auth_token=KEY, max_retries=0)):  # sends Bearer
        assert create(client, max_tokens=2).usage.output_tokens == 2
        assert client.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens > 0
    wrong = Anthropic(base_url=keyed_server, api_key="sk-ant-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        create(wrong, max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body["error"]["type"] == "authentication_error"
