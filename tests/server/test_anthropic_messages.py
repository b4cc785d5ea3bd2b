"""/v1/messages and /v1/messages/count_tokens in process: the request translation, Anthropic's error body (routes,
handlers and middlewares), the stream's event order, the stop sequence, the API key as x-api-key, and the
compatibility table's MESSAGES entry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from nitro_torch.config import build_config
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.server.anthropic.convert import to_chat_request
from nitro_torch.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from nitro_torch.server.anthropic.stream import stop_reason
from nitro_torch.server.app import create_app
from nitro_torch.server.compat import MESSAGES, Field

from .conftest import RunningServer, private_server
from .helpers import ENGINE_OPTIONS, template_ids

HELLO = [{"role": "user", "content": "Hello"}]
BASE = {"model": "claude-sonnet-4-5", "messages": HELLO, "max_tokens": 1}
KEY = "sk-ant-test-0123456789"
WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                         "request_too_large", "rate_limit_error", "api_error", "overloaded_error"}


def anthropic_error(response: httpx.Response | Any, status: int, error_type: str) -> str:
    """The error's message, once the body is Anthropic's shape (and nothing else) with this status and type."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == error_type
    return body["error"]["message"]


def events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every SSE event; each must have both lines, the name equal to data's type."""
    parsed = []
    for frame in response.text.strip().split("\n\n"):
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert data["type"] == name
        parsed.append((name, data))
    return parsed


# ---- translation to the chat pipeline (no engine) -----------------------------------------------------------


def chat_of(**body: Any) -> Any:
    return to_chat_request(MessagesRequest.model_validate({**BASE, **body}))


def test_blocks_become_chat_messages():
    chat = chat_of(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "user", "content": [{"type": "text", "text": "In Paris."}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "...", "signature": "x"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
            {"type": "text", "text": "Thanks."}]},
    ], tools=[WEATHER_TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"], temperature=0.5, top_k=5)
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]  # the two user turns are combined
    assert [p["text"] for p in chat.messages[1].content] == ["Weather?", "In Paris."]
    [call] = chat.messages[2].tool_calls
    assert call["id"] == "toolu_1" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chat.messages[3].tool_call_id == "toolu_1" and chat.messages[3].content == "18 C"
    assert chat.tools[0].function.parameters == WEATHER_TOOL["input_schema"]
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert (chat.stop, chat.temperature, chat.top_k, chat.max_tokens) == (["END"], 0.5, 5, 1)
    assert chat.add_generation_prompt and not chat.continue_final_message


def test_tool_choice_error_results_and_prefill():
    chat = chat_of(messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "no", "is_error": True}]},
        {"role": "assistant", "content": "It is"},
    ], tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    assert chat.messages[2].content == "Error: no"
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.continue_final_message and not chat.add_generation_prompt  # a final assistant turn is a prefill
    assert chat_of(tools=[WEATHER_TOOL], tool_choice={"type": "none"}).tool_choice == "none"


def test_count_tokens_request_has_no_sampling():
    chat = to_chat_request(CountTokensRequest.model_validate({"model": "x", "messages": HELLO}))
    assert chat.max_tokens is None and chat.stop is None


def test_stop_reason_names_only_the_clients_stop_sequences():
    def choice(reason: FinishReason, stop: str | None = None, calls: list | None = None) -> Any:
        final = SimpleNamespace(finish_reason=reason, stop_string=stop)
        return SimpleNamespace(final=final, parser=SimpleNamespace(tool_calls=calls) if calls is not None else None)

    assert stop_reason(choice(FinishReason.STOP, "END"), ["END"]) == ("stop_sequence", "END")
    assert stop_reason(choice(FinishReason.STOP, "USER:"), ["END"]) == ("end_turn", None)  # the template's stop
    assert stop_reason(choice(FinishReason.STOP), ["END"]) == ("end_turn", None)
    assert stop_reason(choice(FinishReason.LENGTH), []) == ("max_tokens", None)
    assert stop_reason(choice(FinishReason.STOP, calls=[object()]), []) == ("tool_use", None)


# ---- errors in Anthropic's shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "named"), [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]},
     "messages.0.content.0: this model does not accept images"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Read:"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]},
     "messages.0.content.1: this model does not accept documents"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, "messages.0.content.0.content.0: this model does not accept images"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "messages.0.content.0: content blocks of type \"tool_use\" are not supported here"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0: a text block needs"),
    ({"system": [{"type": "image", "source": {}}]}, "system.0: this model does not accept images"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0: the server tool"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema: a tool needs an 'input_schema'"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool"}}, "tool_choice.name:"),
    ({"tool_choice": {"type": "any"}}, "'tool_choice' is only allowed when 'tools' are specified"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking: thinking of type \"enabled\""),
    ({"temperature": 1.5}, "'temperature'"),
    ({"max_tokens": None}, "'max_tokens'"),
    ({"max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"stop_sequences": [""]}, "'stop_sequences' stop strings must be non-empty"),
    ({"stop_sequences": "END"}, "'stop_sequences'"),
    ({"stream": "yes"}, "'stream'"),
    ({"messages": [{"role": "system", "content": "x"}]}, "'messages.0.role'"),
    ({"stop_sequences": ["a"] * 17}, "'stop_sequences' at most 16 stop strings"),
    ({"output_config": {"format": {"type": "regex"}}}, "output_config.format: the output format must be"),
])
def test_bad_requests_are_400_naming_the_field(client, body, named):
    message = anthropic_error(client.post("/v1/messages", json={**BASE, **body}), 400, "invalid_request_error")
    assert named in message


def test_missing_max_tokens_and_prompt_too_long(client):
    message = anthropic_error(client.post("/v1/messages", json={"messages": HELLO}), 400, "invalid_request_error")
    assert message == "Missing required parameter: 'max_tokens'."
    long = [{"role": "user", "content": "hello " * 3000}]
    message = anthropic_error(client.post("/v1/messages", json={**BASE, "messages": long}), 400,
                              "invalid_request_error")
    assert "context" in message


def test_handler_errors_are_anthropic_shaped_under_v1_messages_only(client):
    anthropic_error(client.post("/v1/messages/nope", json=BASE), 404, "not_found_error")
    anthropic_error(client.get("/v1/messages"), 405, "invalid_request_error")
    anthropic_error(client.post("/v1/messages", content=b"{not json"), 400, "invalid_request_error")
    # the OpenAI routes keep OpenAI's body
    openai_error = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 0}).json()["error"]
    assert openai_error["param"] == "max_tokens" and openai_error["code"] == "invalid_value"


def test_strict_model_name_is_404_not_found_error(strict_client):
    message = anthropic_error(strict_client.post("/v1/messages", json={**BASE, "model": "claude-opus"}), 404,
                              "not_found_error")
    assert "claude-opus" in message
    served = strict_client.get("/v1/models").json()["data"][0]["id"]
    assert strict_client.post("/v1/messages", json={**BASE, "model": served}).status_code == 200


# ---- answers ------------------------------------------------------------------------------------------------------


def test_message_shape_and_stop_sequence(client):
    greedy = client.post("/v1/messages", json={**BASE, "max_tokens": 24, "temperature": 0},
                         headers={"anthropic-version": "2023-06-01", "anthropic-beta": "any-beta"})
    assert greedy.status_code == 200, greedy.text
    message = greedy.json()
    assert message["id"].startswith("msg_") and message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == client.get("/v1/models").json()["data"][0]["id"]  # the served name, not the asked
    [block] = message["content"]
    text = block["text"]
    assert block["type"] == "text" and message["stop_reason"] in ("end_turn", "max_tokens")
    assert message["stop_sequence"] is None
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    stopped = client.post("/v1/messages", json={**BASE, "max_tokens": 24, "temperature": 0,
                                                "stop_sequences": ["never-generated", stop]}).json()
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == stop
    assert stopped["content"] == [{"type": "text", "text": text[:text.index(stop)]}]
    usage = stopped["usage"]
    counted = client.post("/v1/messages/count_tokens", json={"model": "x", "messages": HELLO}).json()
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == counted["input_tokens"]
    assert usage["cache_creation_input_tokens"] == 0 and usage["output_tokens"] >= 1


def test_count_tokens_is_the_templates_prompt(client, tokenizer):
    body = {"model": "x", "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello."},
                                                               {"role": "user", "content": "Bye"}]}
    response = client.post("/v1/messages/count_tokens", json=body)
    assert response.status_code == 200, response.text
    expected = template_ids(tokenizer, [{"role": "system", "content": "Be brief."}, *body["messages"]])
    assert response.json() == {"input_tokens": len(expected)}
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "x", "messages": []}), 400,
                    "invalid_request_error")


def test_stream_event_order(client):
    body = {**BASE, "max_tokens": 6, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        response.read()
    parsed = events(response)
    names = [name for name, _ in parsed]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = parsed[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    assert parsed[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(data["delta"]["text"] for name, data in parsed if name == "content_block_delta")
    delta = parsed[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6
    assert delta["usage"]["input_tokens"] + delta["usage"]["cache_read_input_tokens"] == \
        start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"]
    plain = client.post("/v1/messages", json={**body, "stream": False}).json()
    assert plain["content"][0]["text"] == text


# ---- the API key, and the middlewares' errors ------------------------------------------------------------------


def test_api_key_as_x_api_key_or_bearer(real_engine):
    config = build_config({**ENGINE_OPTIONS, "api_key": KEY}, env={})
    with TestClient(create_app(config, real_engine), raise_server_exceptions=False) as keyed:
        for headers in ({"x-api-key": KEY, "anthropic-version": "2023-06-01"}, {"Authorization": f"Bearer {KEY}"}):
            assert keyed.post("/v1/messages", json=BASE, headers=headers).status_code == 200
            assert keyed.post("/v1/messages/count_tokens", json=BASE, headers=headers).status_code == 200
            assert keyed.post("/v1/chat/completions", json=BASE, headers=headers).status_code == 200
        for headers in ({}, {"x-api-key": "sk-wrong"}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": ""},
                        {"Authorization": KEY}):
            response = keyed.post("/v1/messages", json=BASE, headers=headers)
            assert "x-api-key" in anthropic_error(response, 401, "authentication_error")
            assert KEY not in response.text
        # the OpenAI routes answer a wrong key in OpenAI's shape
        wrong = keyed.post("/v1/chat/completions", json=BASE, headers={"x-api-key": "sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.fixture
def small_server() -> Iterator[RunningServer]:
    """One sequence at a time with room for one waiting, and a 4 KiB body limit."""
    with private_server(max_num_seqs=1, kv_cache_memory=0.1, max_queued_requests=1,
                        max_request_bytes=4096) as server:
        yield server


def test_admission_errors_are_anthropic_shaped(small_server):
    base = small_server.base_url
    anthropic_error(httpx.post(base + "/v1/messages", content=b"x" * 5000, timeout=60), 413, "request_too_large")
    busy = {**BASE, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    threads = [threading.Thread(target=httpx.post, args=(base + "/v1/chat/completions",),
                                kwargs={"json": busy, "timeout": 120}) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while small_server.engine.stats().num_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.02)  # one running, one waiting: the bound of 1 is reached
    refused = httpx.post(base + "/v1/messages", json=BASE, timeout=60)
    for thread in threads:
        thread.join(timeout=120)
    assert "overloaded" in anthropic_error(refused, 429, "rate_limit_error")
    assert refused.headers["retry-after"] == "1"


# ---- the compatibility table --------------------------------------------------------------------------------------


def test_every_parsed_field_is_in_the_table_and_back():
    parsed = set(MessagesRequest.model_fields)
    listed = {f.name for f in MESSAGES.fields if f.status != "ignored"}
    ignored = {f.name for f in MESSAGES.fields if f.status == "ignored"}
    assert parsed == listed, f"schema-only: {parsed - listed}; table-only: {listed - parsed}"
    assert not parsed & ignored
    assert len({f.name for f in MESSAGES.fields}) == len(MESSAGES.fields)


@pytest.mark.parametrize("field", [f for f in MESSAGES.fields if f.status == "rejected"], ids=lambda f: f.name)
def test_rejected_fields_answer_400_naming_the_field(client, field: Field):
    response = client.post(MESSAGES.path, json={**BASE, field.name: field.example})
    assert anthropic_error(response, 400, "invalid_request_error").startswith(f"{field.name}: ")


@pytest.mark.parametrize("field", [f for f in MESSAGES.fields if f.status == "ignored"], ids=lambda f: f.name)
def test_ignored_fields_are_accepted(client, field: Field):
    response = client.post(MESSAGES.path, json={**BASE, field.name: field.example})
    assert response.status_code == 200, response.text


def test_error_types_are_anthropics():
    from nitro_torch.server.anthropic.errors import error_type
    from nitro_torch.server.http.errors import APIError

    for status in (400, 401, 403, 404, 405, 413, 422, 429, 500, 503):
        assert error_type(APIError(status, "x")) in ANTHROPIC_ERROR_TYPES
    assert error_type(APIError(503, "engine stopped", type="server_error")) == "api_error"


def test_the_detokenizer_reports_the_stop_string_that_ended_the_text(tokenizer):
    from nitro_torch.engine.detokenizer import IncrementalDetokenizer
    from nitro_torch.sampling import SamplingParams

    ids = tokenizer.encode("Hello world, how are you?", add_special_tokens=False)
    for include in (False, True):
        detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["you", " how", "world"],
                                                                           include_stop_str_in_output=include))
        text = ""
        for token_id in ids:
            text += detokenizer.add(token_id)
            if detokenizer.stopped:
                break
        assert detokenizer.stop_string == "world"  # the first to complete
        assert text == ("Hello world" if include else "Hello ")
    assert IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["x"])).stop_string is None
