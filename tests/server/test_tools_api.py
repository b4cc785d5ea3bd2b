"""Tool calling end to end: the official OpenAI client against an in-process server on a tiny random-weight model
whose chat template supports tools (forced calls come from the grammar, not from the model's skill), and on the
default model, whose template does not (the built-in tool prompt)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.tool_fixtures import (  # noqa: F401  (fixtures)
    PARAMETERS_BY_NAME,
    TOOLS,
    assemble_streamed_calls,
    tool_async_engine,
    tool_engine_config,
    tool_model_dir,
    tool_server_url,
)

QUESTION = [{"role": "user", "content": "What is the weather in Tokyo, in celsius?"}]
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
def client(tool_server_url) -> OpenAI:  # noqa: F811
    return OpenAI(base_url=tool_server_url, api_key="unused", max_retries=0, timeout=300)


def assert_valid_call(name: str, arguments: str) -> dict:
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, PARAMETERS_BY_NAME[name])
    return parsed


def test_required_call_then_the_tool_result_gives_an_answer(client):
    reply = client.chat.completions.create(model="", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in PARAMETERS_BY_NAME
    assert_valid_call(call.function.name, call.function.arguments)

    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"}]
    answer = client.chat.completions.create(model="", messages=history, tools=TOOLS, max_tokens=8, seed=1)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)


def test_a_named_choice_streams_the_same_call(client):
    request = {"model": "", "messages": QUESTION, "tools": TOOLS, "tool_choice": WEATHER_CHOICE, "max_tokens": 200,
               "temperature": 0}
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "tool_calls"
    [expected] = whole.message.tool_calls

    content, finish_reasons, calls = assemble_streamed_calls(client.chat.completions.create(**request, stream=True))
    assert content == ""
    assert finish_reasons == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == expected.function.arguments  # greedy: the same call both ways
    assert_valid_call("get_weather", calls[0]["arguments"])


def test_tool_choice_none_answers_with_text(client):
    reply = client.chat.completions.create(model="", messages=QUESTION, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, seed=2)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_choice_naming_an_unknown_function_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_stock_price"}})
    assert info.value.status_code == 400
    assert info.value.body["param"] == "tool_choice"


def test_tools_on_a_model_whose_template_ignores_them_use_the_built_in_prompt(threaded_server):
    """The default model's template has no tools: they are written into its system turn (chat/tool_prompt.py)."""
    default_model = OpenAI(base_url=threaded_server.api_url, api_key="unused", max_retries=0, timeout=300)
    plain = default_model.chat.completions.create(model="", messages=QUESTION, max_tokens=1, temperature=0)
    reply = default_model.chat.completions.create(model="", messages=QUESTION, tools=TOOLS, max_tokens=100,
                                                  temperature=0, tool_choice=WEATHER_CHOICE)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools section is in the prompt
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert_valid_call("get_weather", call.function.arguments)
    none = default_model.chat.completions.create(model="", messages=QUESTION, tools=TOOLS, max_tokens=1,
                                                 temperature=0, tool_choice="none")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # 'none' shows no tools
