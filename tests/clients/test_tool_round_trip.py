"""Tools on the real default model (SmolLM2-135M-Instruct, whose ChatML template cannot render tools) through the
official OpenAI Python client against a live `nitro-torch serve`: the built-in tool prompt (chat/tool_prompt.py)
shows the tools, a forced tool_choice makes the call by grammar, and the call and its result go back as history.
The model is tiny: these assert the protocol's structure, not the model's judgement."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from openai import OpenAI

from tests.tool_fixtures import PARAMETERS_BY_NAME, TOOLS, assemble_streamed_calls

QUESTION = [{"role": "user", "content": "What is the weather in Tokyo, in celsius?"}]
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}
RESULT = "22 degrees, sunny"
GREEDY: dict[str, Any] = {"model": "", "temperature": 0}


def assert_valid_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS_BY_NAME[call.function.name])
    return arguments


def assert_consistent(choice: Any) -> None:
    """A reply is either calls (finish_reason 'tool_calls', each valid) or an answer in text."""
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name in PARAMETERS_BY_NAME
            json.loads(call.function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str) and choice.message.content


def test_a_required_call_then_its_result_gives_an_answer(client: OpenAI, smol_tokenizer: Any):
    reply = client.chat.completions.create(**GREEDY, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name in PARAMETERS_BY_NAME
    assert_valid_call(call)

    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    answer = client.chat.completions.create(**GREEDY, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=48)
    final = answer.choices[0]
    assert final.finish_reason in ("stop", "length")
    assert final.message.tool_calls is None
    assert isinstance(final.message.content, str) and final.message.content
    # 'none' shows no tools, but the call and its result are in the prompt, as text the template renders.
    question = client.chat.completions.create(**GREEDY, messages=QUESTION, max_tokens=1)
    grown = answer.usage.prompt_tokens - question.usage.prompt_tokens
    assert grown > len(smol_tokenizer.encode(call.function.arguments + RESULT, add_special_tokens=False))

    # An agent loop sends the tools again with 'auto': the reply is an answer or another valid call.
    again = client.chat.completions.create(**GREEDY, messages=history, tools=TOOLS, max_tokens=48)
    assert_consistent(again.choices[0])


def test_a_named_call_streams_as_deltas_that_assemble_into_valid_arguments(client: OpenAI):
    stream = client.chat.completions.create(**GREEDY, messages=QUESTION, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                            max_tokens=200, stream=True)
    content, finish_reasons, calls = assemble_streamed_calls(stream)
    assert content == ""
    assert finish_reasons == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS_BY_NAME["get_weather"])


def test_auto_answers_or_calls(client: OpenAI):
    reply = client.chat.completions.create(**GREEDY, messages=QUESTION, tools=TOOLS, tool_choice="auto",
                                           max_tokens=32)
    assert_consistent(reply.choices[0])
    assert reply.usage.prompt_tokens > 200  # the tools section is in the prompt


def test_none_shows_no_tools_and_makes_no_calls(client: OpenAI):
    none = client.chat.completions.create(**GREEDY, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                          max_tokens=16)
    plain = client.chat.completions.create(**GREEDY, messages=QUESTION, max_tokens=16)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
