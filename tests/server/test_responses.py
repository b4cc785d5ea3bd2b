"""POST /v1/responses in process: the event order of a stream, the store (per app, bounded, oldest dropped first)
and the 400/404 answers, each naming the Responses field. The live server's tests are tests/clients/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from nitro_torch.config import build_config

from .helpers import ENGINE_OPTIONS, template_ids

SHORT = {"input": "Hello", "max_output_tokens": 4, "temperature": 0}
MESSAGE_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"]


def events_of(text: str) -> list[dict[str, Any]]:
    """The SSE frames of a Responses stream; each frame's `event:` line names its data's type."""
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append(data)
    return events


def squeezed(types: list[str]) -> list[str]:
    """Runs of one event type as one (the deltas)."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


@contextmanager
def app_with_store(real_engine, capacity: int) -> Iterator[TestClient]:
    from nitro_torch.server.app import create_app

    config = build_config({**ENGINE_OPTIONS, "responses_store": capacity}, env={})
    with TestClient(create_app(config, real_engine), raise_server_exceptions=False) as test_client:
        yield test_client


def official(test_client: TestClient) -> OpenAI:
    """The official client, talking to the in-process app."""
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=test_client, max_retries=0)


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- streaming -------------------------------------------------------------------------------------------


def test_a_stream_sends_the_events_in_order_and_ends_with_the_stored_response(client):
    text = client.post("/v1/responses", json={**SHORT, "max_output_tokens": 40, "stream": True}).text
    events = events_of(text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert squeezed(types) == ["response.created", "response.in_progress", *MESSAGE_EVENTS, "response.completed"]
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert final["id"] == created["id"] and final["status"] == "completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    [message] = final["output"]
    assert deltas == done["text"] == message["content"][0]["text"]
    assert message["status"] == "completed" and message["id"] == events[2]["item"]["id"]
    assert events[2]["item"]["content"] == []  # the part comes with content_part.added
    assert client.get(f"/v1/responses/{final['id']}").json() == final


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(client):
    events = events_of(client.post("/v1/responses", json={**SHORT, "max_output_tokens": 2, "stream": True}).text)
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
    assert final["response"]["usage"]["output_tokens"] == 2


def test_a_plain_answer_is_the_streamed_one(client):
    plain = client.post("/v1/responses", json=SHORT).json()
    events = events_of(client.post("/v1/responses", json={**SHORT, "stream": True}).text)
    streamed = events[-1]["response"]
    assert streamed["output"][0]["content"] == plain["output"][0]["content"]
    assert streamed["usage"] == plain["usage"]


def test_logprobs_are_included_when_asked_for(client):
    body = client.post("/v1/responses", json={**SHORT, "include": ["message.output_text.logprobs"],
                                               "top_logprobs": 2}).json()
    part = body["output"][0]["content"][0]
    assert len(part["logprobs"]) == body["usage"]["output_tokens"]
    assert "".join(entry["token"] for entry in part["logprobs"]) == part["text"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in part["logprobs"])
    assert client.post("/v1/responses", json=SHORT).json()["output"][0]["content"][0]["logprobs"] == []


# ---- the conversation a response continues ---------------------------------------------------------------


def test_previous_response_id_replays_the_conversation_without_its_instructions(client, tokenizer):
    first = client.post("/v1/responses", json={**SHORT, "instructions": "Be brief."}).json()
    answer = first["output"][0]["content"][0]["text"]
    assert first["usage"]["input_tokens"] == len(template_ids(tokenizer, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]))
    second = client.post("/v1/responses", json={**SHORT, "input": "And then?",
                                                 "previous_response_id": first["id"]}).json()
    assert second["previous_response_id"] == first["id"]
    assert second["usage"]["input_tokens"] == len(template_ids(tokenizer, [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"}]))


def test_the_store_drops_the_oldest_and_is_per_app(real_engine):
    with app_with_store(real_engine, 2) as test_client, app_with_store(real_engine, 2) as other:
        api = official(test_client)
        ids = [api.responses.create(model="", input="Hi", max_output_tokens=1).id for _ in range(3)]
        with pytest.raises(openai.NotFoundError) as missing:
            api.responses.retrieve(ids[0])
        assert missing.value.body["param"] == "response_id"
        with pytest.raises(openai.NotFoundError) as evicted:
            api.responses.create(model="", input="Hi", max_output_tokens=1, previous_response_id=ids[0])
        assert f"Previous response with id '{ids[0]}' not found" in evicted.value.message
        assert evicted.value.code == "previous_response_not_found"
        assert api.responses.retrieve(ids[2]).id == ids[2]
        continued = api.responses.create(model="", input="Hi", max_output_tokens=1, previous_response_id=ids[2])
        assert continued.previous_response_id == ids[2]
        with pytest.raises(openai.NotFoundError):
            official(other).responses.retrieve(ids[2])


def test_store_false_keeps_nothing_and_delete_forgets(client):
    unstored = client.post("/v1/responses", json={**SHORT, "store": False}).json()
    assert unstored["store"] is False
    assert_error(client.get(f"/v1/responses/{unstored['id']}"), 404, "response_id", "response_not_found")
    stored = client.post("/v1/responses", json=SHORT).json()
    assert stored["store"] is True
    assert_error(client.get(f"/v1/responses/{stored['id']}?stream=true"), 400, "stream")
    assert client.delete(f"/v1/responses/{stored['id']}").json() == {
        "id": stored["id"], "object": "response.deleted", "deleted": True}
    assert_error(client.get(f"/v1/responses/{stored['id']}"), 404, "response_id")
    assert_error(client.delete(f"/v1/responses/{stored['id']}"), 404, "response_id")


def test_with_no_store_only_an_explicit_store_true_is_a_400(real_engine):
    with app_with_store(real_engine, 0) as test_client:
        answer = test_client.post("/v1/responses", json=SHORT).json()
        assert answer["store"] is False
        assert_error(test_client.get(f"/v1/responses/{answer['id']}"), 404, "response_id")
        error = assert_error(test_client.post("/v1/responses", json={**SHORT, "store": True}), 400, "store")
        assert "--responses-store 0" in error["message"]
        assert_error(test_client.post("/v1/responses", json={**SHORT, "previous_response_id": answer["id"]}),
                     404, "previous_response_id", "previous_response_not_found")


# ---- 400s naming the Responses field ---------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"input": None}, "input"),
    ({"input": 3}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "message", "role": "user",
                 "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "Hi"}]}, "input[0].role"),
    ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": 3}}}, "text.format.schema"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"include": ["everything"]}, "include"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"stream": "yes"}, "stream"),
])
def test_a_bad_field_is_a_400_naming_it(client, fields, param):
    error = assert_error(client.post("/v1/responses", json={**SHORT, **fields}), 400, param)
    assert "messages" not in error["message"] and "response_format" not in error["message"]
    assert "'max_tokens'" not in error["message"]


def test_a_conversation_longer_than_the_context_is_a_400_on_input(client):
    error = assert_error(client.post("/v1/responses", json={**SHORT, "input": "word " * 3000}), 400, "input",
                         "context_length_exceeded")
    assert "maximum context length" in error["message"]


def test_ignored_and_accepted_fields_change_nothing(client):
    plain = client.post("/v1/responses", json=SHORT).json()
    extra = client.post("/v1/responses", json={
        **SHORT, "reasoning": {"effort": "low"}, "truncation": "disabled", "service_tier": "auto",
        "include": ["reasoning.encrypted_content"], "metadata": {"team": "a"}, "user": "u-1",
        "tool_choice": "auto", "text": {"format": {"type": "text"}, "verbosity": "low"},
        "input": [{"type": "reasoning", "id": "rs_1", "summary": []},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
    }).json()
    assert extra["output"][0]["content"] == plain["output"][0]["content"]
    assert extra["metadata"] == {"team": "a"} and extra["user"] == "u-1"
    assert extra["reasoning"] == {"effort": "low", "summary": None}
