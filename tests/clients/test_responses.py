"""The official `openai` Python client's Responses API (`client.responses`) against `nitro-torch serve` on the real
default model: plain and streamed answers, structured output, forced tool calls and their round trip, and the
stored conversations of `previous_response_id`. Greedy answers are compared with each other, never with fixed
text."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response
from pydantic import BaseModel

from tests.tool_fixtures import PARAMETERS_BY_NAME, TOOLS

pytestmark = pytest.mark.slow

WEATHER = "What is the weather in Tokyo, in celsius?"
FUNCTION_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
"""The chat tools of the tool tests in the Responses API's flat shape."""
MESSAGE_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


class Person(BaseModel):
    name: str
    age: int
    pet: str


def respond(client: OpenAI, input: Any = "Hello", **fields: Any) -> Response:
    """Greedy and short unless told otherwise."""
    fields.setdefault("max_output_tokens", 24)
    fields.setdefault("temperature", 0)
    return client.responses.create(model="", input=input, **fields)


def template_length(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))


def squeezed(types: list[str]) -> list[str]:
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


@pytest.fixture(scope="module")
def greedy(client: OpenAI) -> Response:
    reply = respond(client, include=["message.output_text.logprobs"], top_logprobs=2)
    assert reply.status == "completed", "the reference answer must end on its own"
    return reply


# ---- plain answers ---------------------------------------------------------------------------------------


def test_a_string_input_is_answered_with_one_message(greedy, served_name, smol_tokenizer):
    assert greedy.id.startswith("resp_") and greedy.object == "response" and greedy.model == served_name
    [message] = greedy.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    [part] = message.content
    assert part.type == "output_text" and part.annotations == [] and part.text
    assert greedy.output_text == part.text
    usage = greedy.usage
    assert usage.input_tokens == template_length(smol_tokenizer, [{"role": "user", "content": "Hello"}])
    assert usage.output_tokens == len(part.logprobs) + 1  # the end-of-sequence token is no text
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens >= 0


def test_message_items_are_the_string_input(client, greedy):
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]
    assert respond(client, items).output_text == greedy.output_text
    assert respond(client, [{"role": "user", "content": "Hello"}]).output_text == greedy.output_text


def test_instructions_are_the_system_message(client, greedy, smol_tokenizer):
    reply = respond(client, instructions="Answer in French.")
    assert reply.instructions == "Answer in French."
    assert reply.usage.input_tokens == template_length(smol_tokenizer, [
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}])
    developer = respond(client, [{"role": "developer", "content": "Answer in French."},
                                 {"role": "user", "content": "Hello"}])
    assert developer.output_text == reply.output_text


def test_max_output_tokens_ends_incomplete(client, greedy):
    reply = respond(client, max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3 and reply.max_output_tokens == 3
    assert greedy.output_text.startswith(reply.output_text)


def test_a_json_schema_format_parses_into_the_model(client):
    reply = client.responses.parse(model="", input="Describe a person who has a pet.", text_format=Person,
                                   max_output_tokens=60, temperature=0)
    assert reply.status == "completed"
    assert isinstance(reply.output_parsed, Person)
    schema = Person.model_json_schema()
    jsonschema.validate(json.loads(reply.output_text), schema)
    assert reply.text.format.type == "json_schema"


def test_a_json_object_format_gives_an_object(client, greedy):
    with pytest.raises(json.JSONDecodeError):
        json.loads(greedy.output_text)  # unconstrained, the model answers in prose
    reply = respond(client, text={"format": {"type": "json_object"}}, max_output_tokens=64)
    assert reply.status == "completed" and reply.text.format.type == "json_object"
    assert isinstance(json.loads(reply.output_text), dict)


def test_a_400_is_an_openai_error_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as refused:
        respond(client, tools=[{"type": "web_search"}])
    assert refused.value.param == "tools[0].type" and "built-in tools" in refused.value.message
    with pytest.raises(openai.BadRequestError) as image:
        respond(client, [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}])
    assert image.value.param == "input[0].content[0]" and "images" in image.value.message


def test_logprobs_describe_each_token_of_the_text(greedy):
    [part] = greedy.output[0].content
    assert "".join(entry.token for entry in part.logprobs) == part.text
    for entry in part.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: the token taken is the likeliest
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


# ---- streaming -------------------------------------------------------------------------------------------


def test_a_stream_sends_the_events_in_order_and_its_deltas_are_the_answer(client, greedy):
    with client.responses.stream(model="", input="Hello", max_output_tokens=24, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert squeezed(types) == ["response.created", "response.in_progress", *MESSAGE_EVENTS, "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text == greedy.output_text
    assert final.usage.output_tokens == greedy.usage.output_tokens
    assert final.id == events[0].response.id


def test_create_with_stream_true_ends_with_response_incomplete_when_cut(client, greedy):
    events = list(respond(client, stream=True, max_output_tokens=3))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert greedy.output_text.startswith("".join(e.delta for e in events if e.type == "response.output_text.delta"))


# ---- tools -----------------------------------------------------------------------------------------------


def assert_valid_call(name: str, arguments: str) -> dict[str, Any]:
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, PARAMETERS_BY_NAME[name])
    return parsed


def test_a_required_call_then_its_output_gives_the_final_message(client):
    reply = respond(client, WEATHER, tools=FUNCTION_TOOLS, tool_choice="required", parallel_tool_calls=False,
                    max_output_tokens=200)
    assert reply.status == "completed"
    [call] = reply.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert_valid_call(call.name, call.arguments)
    assert reply.tools[0].name == "get_weather" and reply.tool_choice == "required"

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees, sunny"}
    # tool_choice "none": the answer must be a message, whatever a small model would rather do
    answer = respond(client, [result], previous_response_id=reply.id, tools=FUNCTION_TOOLS, tool_choice="none")
    assert [item.type for item in answer.output] == ["message"] and answer.output_text
    # the same round trip without the store: the client sends the whole conversation
    stateless = respond(client, [{"role": "user", "content": WEATHER}, call.model_dump(exclude_none=True), result],
                        tools=FUNCTION_TOOLS, tool_choice="none", store=False)
    assert stateless.output_text == answer.output_text
    assert stateless.usage.input_tokens == answer.usage.input_tokens


def test_a_named_call_streams_as_a_function_call_item(client):
    request = {"tools": FUNCTION_TOOLS, "tool_choice": {"type": "function", "name": "get_time"},
               "max_output_tokens": 200}
    whole = respond(client, WEATHER, **request)
    [call] = whole.output
    assert call.name == "get_time"
    assert_valid_call("get_time", call.arguments)
    with client.responses.stream(model="", input=WEATHER, temperature=0, **request) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert squeezed(types) == ["response.created", "response.in_progress", *CALL_EVENTS, "response.completed"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments == final.output[0].arguments
    assert final.output[0].name == "get_time"


# ---- stored responses ------------------------------------------------------------------------------------


def test_previous_response_id_continues_the_stored_conversation(client, greedy, smol_tokenizer):
    follow = respond(client, "Say it again.", previous_response_id=greedy.id)
    assert follow.previous_response_id == greedy.id
    assert follow.usage.input_tokens == template_length(smol_tokenizer, [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": greedy.output_text},
        {"role": "user", "content": "Say it again."}])
    replayed = respond(client, [{"role": "user", "content": "Hello"},
                                {"role": "assistant", "content": greedy.output_text},
                                {"role": "user", "content": "Say it again."}])
    assert follow.output_text == replayed.output_text


def test_retrieve_and_delete_a_stored_response(client):
    reply = respond(client, metadata={"run": "test"}, max_output_tokens=4)
    kept = client.responses.retrieve(reply.id)
    assert kept.model_dump() == reply.model_dump()
    assert kept.metadata == {"run": "test"}
    client.responses.delete(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)


def test_an_unknown_previous_response_id_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as missing:
        respond(client, "Hi", previous_response_id="resp_unknown")
    assert "Previous response with id 'resp_unknown' not found" in missing.value.message
    assert missing.value.code == "previous_response_not_found"
