"""The official `openai` Python client against `nitro-torch serve` on the real default model: every request field
once, each with an assertion on its effect. Greedy answers are compared with each other, never with fixed text."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.tool_fixtures import PARAMETERS_BY_NAME, TOOLS

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello"}]
REPEAT = [{"role": "user", "content": "Write the word 'cat' twenty times, separated by spaces."}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Tokyo, in celsius?"}]
ROOM = 24
"""max_tokens of the reference answers: room for the greedy answer to HELLO to end on its own."""
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                   "pet": {"type": "string", "enum": ["cat", "dog"]}},
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def chat(client: OpenAI, messages: list[dict[str, Any]] = HELLO, **fields: Any) -> ChatCompletion:
    """Greedy unless told otherwise, short."""
    fields.setdefault("max_tokens", 12)
    fields.setdefault("temperature", 0)
    return client.chat.completions.create(model="", messages=messages, **fields)


def content(reply: ChatCompletion) -> str:
    return reply.choices[0].message.content or ""


def tokens(reply: ChatCompletion) -> list[str]:
    return [entry.token for entry in reply.choices[0].logprobs.content]


def usage_counts(reply: ChatCompletion | ChatCompletionChunk) -> tuple[int, int, int]:
    return reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens


def template_length(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> int:
    options.setdefault("add_generation_prompt", True)
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **options))


def single_token_id(tokenizer: Any, text: str) -> int:
    [token_id] = tokenizer.encode(text, add_special_tokens=False)
    return token_id


def stream_chunks(client: OpenAI, messages: list[dict[str, Any]] = HELLO, **fields: Any) -> list[ChatCompletionChunk]:
    fields.setdefault("max_tokens", ROOM)
    return list(client.chat.completions.create(model="", messages=messages, temperature=0, stream=True, **fields))


@pytest.fixture(scope="module")
def greedy(client: OpenAI) -> ChatCompletion:
    """The reference: the greedy answer to HELLO, ended by the model, with the top-2 logprobs of every token."""
    reply = chat(client, max_tokens=ROOM, logprobs=True, top_logprobs=2)
    assert reply.choices[0].finish_reason == "stop", "the reference answer must end on its own"
    assert len(content(reply).split()) >= 4, "the stop tests need a few words"
    return reply


# ---- model, messages, usage ------------------------------------------------------------------------------


def test_empty_and_served_model_names_give_the_same_answer(client, served_name, greedy):
    named = client.chat.completions.create(model=served_name, messages=HELLO, temperature=0, max_tokens=ROOM)
    assert greedy.model == named.model == served_name
    assert content(named) == content(greedy)


def test_a_name_copied_from_elsewhere_is_answered_by_the_served_model(client, served_name, greedy):
    # langchain's default model name, and one copied from OpenAI's docs: one model is served, as Nitro did.
    for name in ("gpt-3.5-turbo", "gpt-4o-mini"):
        reply = client.chat.completions.create(model=name, messages=HELLO, temperature=0, max_tokens=ROOM)
        assert reply.model == served_name and content(reply) == content(greedy)


def test_text_content_parts_are_the_string_content(client, greedy):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    reply = chat(client, parts, max_tokens=ROOM)
    assert content(reply) == content(greedy)
    assert reply.usage.prompt_tokens == greedy.usage.prompt_tokens


def test_an_image_part_is_a_400(client):
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, image)
    assert "does not accept images" in info.value.body["message"]
    assert info.value.body["param"] == "messages"


def test_usage_counts_the_templated_prompt_and_every_generated_token(greedy, smol_tokenizer):
    usage = greedy.usage
    assert usage.prompt_tokens == template_length(smol_tokenizer, HELLO)
    assert usage.completion_tokens == len(tokens(greedy))  # the end-of-sequence token included
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert greedy.object == "chat.completion" and greedy.id.startswith("chatcmpl-")


def test_a_400_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"


# ---- length and stop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_reports_length(client, greedy, field):
    reply = client.chat.completions.create(model="", messages=HELLO, temperature=0, **{field: 3})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert content(reply) == "".join(tokens(greedy)[:3])


def test_a_stop_string_cuts_before_it(client, greedy):
    text = content(greedy)
    stop = " " + text.split()[2]
    reply = chat(client, stop=stop, max_tokens=ROOM)
    assert reply.choices[0].finish_reason == "stop"
    assert content(reply) == text[:text.index(stop)]


def test_the_first_stop_of_a_list_that_appears_cuts(client, greedy):
    text = content(greedy)
    words = text.split()
    reply = chat(client, stop=["<never seen>", " " + words[3], " " + words[2]], max_tokens=ROOM)
    assert reply.choices[0].finish_reason == "stop"
    assert content(reply) == text[:text.index(" " + words[2])]


def test_include_stop_str_in_output_keeps_the_stop(client, greedy):
    text = content(greedy)
    stop = " " + text.split()[2]
    reply = chat(client, stop=stop, max_tokens=ROOM, extra_body={"include_stop_str_in_output": True})
    assert reply.choices[0].finish_reason == "stop"
    assert content(reply) == text[:text.index(stop) + len(stop)]


def test_stop_token_ids_end_on_that_token(client, greedy, smol_tokenizer):
    third = tokens(greedy)[2]
    reply = chat(client, max_tokens=ROOM, extra_body={"stop_token_ids": [single_token_id(smol_tokenizer, third)]})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 3
    assert content(reply) == "".join(tokens(greedy)[:2])  # like vLLM: the stop token's text is left out


def test_min_tokens_holds_off_the_end(client, greedy):
    at_least = greedy.usage.completion_tokens + 4
    reply = chat(client, max_tokens=ROOM, extra_body={"min_tokens": at_least})
    assert reply.usage.completion_tokens >= at_least
    assert content(reply).startswith(content(greedy)) and content(reply) != content(greedy)


def test_ignore_eos_runs_to_max_tokens(client, greedy):
    limit = greedy.usage.completion_tokens + 4
    reply = chat(client, max_tokens=limit, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == limit
    assert content(reply).startswith(content(greedy))


def test_skip_special_tokens_false_shows_the_end_token(client, greedy, smol_tokenizer):
    limit = greedy.usage.completion_tokens + 2
    shown = chat(client, max_tokens=limit, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    hidden = chat(client, max_tokens=limit, extra_body={"ignore_eos": True})
    assert smol_tokenizer.eos_token in content(shown)
    assert smol_tokenizer.eos_token not in content(hidden)


# ---- sampling --------------------------------------------------------------------------------------------


def test_n_choices_share_one_prompt(client, greedy):
    reply = chat(client, n=3, temperature=1, seed=7, max_tokens=8, logprobs=True)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in reply.choices}) > 1
    assert reply.usage.prompt_tokens == greedy.usage.prompt_tokens  # counted once
    assert reply.usage.completion_tokens == sum(len(choice.logprobs.content) for choice in reply.choices)


def test_the_same_seed_gives_the_same_sample(client):
    first, again, other = (chat(client, temperature=1, seed=seed, max_tokens=16) for seed in (1234, 1234, 1235))
    assert content(first) == content(again)
    assert content(first) != content(other)


def test_temperature_zero_takes_the_top_token_and_a_hot_sample_does_not(client, greedy):
    assert all(entry.token == entry.top_logprobs[0].token for entry in greedy.choices[0].logprobs.content)
    hot = chat(client, temperature=2, seed=5, max_tokens=16, logprobs=True, top_logprobs=1)
    assert any(entry.token != entry.top_logprobs[0].token for entry in hot.choices[0].logprobs.content)


@pytest.fixture(scope="module")
def hot(client: OpenAI) -> ChatCompletion:
    return chat(client, temperature=1.5, seed=5, max_tokens=ROOM)


@pytest.mark.parametrize("fields", [{"top_p": 1e-6}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}],
                         ids=["top_p", "top_k", "min_p"])
def test_keeping_only_the_top_token_is_greedy(client, greedy, hot, fields):
    assert content(hot) != content(greedy)  # without the cut, this seed and temperature leave the greedy path
    reply = chat(client, temperature=1.5, seed=5, max_tokens=ROOM, **fields)
    assert content(reply) == content(greedy)


@pytest.fixture(scope="module")
def repeating(client: OpenAI) -> ChatCompletion:
    return chat(client, REPEAT, max_tokens=ROOM, logprobs=True)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_on_generated_tokens_change_what_follows(client, repeating, field):
    reply = chat(client, REPEAT, max_tokens=ROOM, logprobs=True, **{field: 2.0})
    assert tokens(reply)[0] == tokens(repeating)[0]  # nothing generated yet: nothing to penalise
    assert content(reply) != content(repeating)


def test_repetition_penalty_changes_the_answer(client, repeating):
    reply = chat(client, REPEAT, max_tokens=ROOM, extra_body={"repetition_penalty": 1.8})
    assert content(reply) != content(repeating)


def test_logit_bias_bans_and_forces_tokens(client, greedy, smol_tokenizer):
    first = tokens(greedy)[0]
    banned = chat(client, max_tokens=4, logprobs=True, logit_bias={str(single_token_id(smol_tokenizer, first)): -100})
    assert tokens(banned)[0] != first
    forced_id = single_token_id(smol_tokenizer, " Paris")
    forced = chat(client, max_tokens=4, logprobs=True, logit_bias={str(forced_id): 100})
    assert tokens(forced) == [" Paris"] * 4 and content(forced) == " Paris" * 4


def test_logprobs_describe_each_token(client, greedy, smol_tokenizer):
    entries = greedy.choices[0].logprobs.content
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)
    assert entries[-1].token == smol_tokenizer.eos_token
    assert "".join(entry.token for entry in entries[:-1]) == content(greedy)
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_user_is_accepted_and_changes_nothing(client, greedy):
    assert content(chat(client, max_tokens=ROOM, user="user-1234")) == content(greedy)


# ---- structured output -----------------------------------------------------------------------------------


def test_response_format_text_is_plain_generation(client, greedy):
    assert content(chat(client, max_tokens=ROOM, response_format={"type": "text"})) == content(greedy)


def test_response_format_json_object_gives_an_object(client, greedy):
    with pytest.raises(json.JSONDecodeError):
        json.loads(content(greedy))  # unconstrained, the model answers in prose
    reply = chat(client, max_tokens=64, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(content(reply)), dict)


def test_response_format_json_schema_validates(client):
    reply = chat(client, [{"role": "user", "content": "Give a person's name, age and pet as JSON."}], max_tokens=64,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content(reply)), PERSON_SCHEMA)


# ---- streaming -------------------------------------------------------------------------------------------


def test_a_stream_matches_the_plain_answer_with_logprobs_and_usage(client, greedy):
    chunks = stream_chunks(client, logprobs=True, top_logprobs=2, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    *deltas, last = chunks
    assert last.choices == [] and usage_counts(last) == usage_counts(greedy)
    assert all(chunk.usage is None for chunk in deltas)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in deltas)
    assert text == content(greedy)
    assert [chunk.choices[0].finish_reason for chunk in deltas if chunk.choices[0].finish_reason] == ["stop"]
    assert deltas[-1].choices[0].finish_reason == "stop"
    streamed = [entry for chunk in deltas if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [entry.token for entry in streamed] == tokens(greedy)
    assert [len(entry.top_logprobs) for entry in streamed] == [2] * len(streamed)


def test_a_stream_without_include_usage_has_no_usage(client, greedy):
    chunks = stream_chunks(client)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content(greedy)


def test_continuous_usage_stats_count_up_in_every_chunk(client, greedy):
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = stream_chunks(client, extra_body=options)
    assert all(chunk.usage is not None for chunk in chunks)
    assert {chunk.usage.prompt_tokens for chunk in chunks} == {greedy.usage.prompt_tokens}
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == greedy.usage.completion_tokens and counts[0] < counts[-1]


def test_a_stream_of_n_choices_carries_every_index(client):
    chunks = list(client.chat.completions.create(model="", messages=HELLO, n=2, temperature=1, seed=3, max_tokens=6,
                                                 stream=True))
    finished = {choice.index: choice.finish_reason for chunk in chunks for choice in chunk.choices
                if choice.finish_reason}
    assert finished == {0: "length", 1: "length"}


# ---- the chat template -----------------------------------------------------------------------------------


def test_add_generation_prompt_false_leaves_the_assistant_header_out(client, greedy, smol_tokenizer):
    reply = chat(client, max_tokens=2, extra_body={"add_generation_prompt": False})
    assert reply.usage.prompt_tokens == template_length(smol_tokenizer, HELLO, add_generation_prompt=False)
    assert reply.usage.prompt_tokens < greedy.usage.prompt_tokens


def test_continue_final_message_goes_on_from_the_given_start(client, greedy, smol_tokenizer):
    start = "".join(tokens(greedy)[:4])
    messages = HELLO + [{"role": "assistant", "content": start}]
    reply = chat(client, messages, max_tokens=ROOM,
                 extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert reply.usage.prompt_tokens == template_length(smol_tokenizer, messages, add_generation_prompt=False,
                                                        continue_final_message=True)
    assert start + content(reply) == content(greedy)


def test_chat_template_kwargs_unread_change_nothing_reserved_are_a_400(client, greedy):
    unused = chat(client, max_tokens=ROOM, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert content(unused) == content(greedy)  # a variable the template does not read changes nothing
    assert unused.usage.prompt_tokens == greedy.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, extra_body={"chat_template_kwargs": {"tokenize": False}})
    assert info.value.body["param"] == "chat_template_kwargs"


# ---- tools (the tiny tool model) -------------------------------------------------------------------------


def assert_valid_call(call: Any) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS_BY_NAME[call.function.name])
    assert call.type == "function" and call.id
    return arguments


def test_tools_on_the_default_model_use_the_built_in_tool_prompt(client):
    # Its template cannot render tools; the full round trip is in test_tool_round_trip.py.
    reply = chat(client, WEATHER_QUESTION, tools=TOOLS, max_tokens=100,
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert_valid_call(call)


def test_tool_choice_required_round_trip(tool_client, smol_tokenizer):
    reply = tool_client.chat.completions.create(model="", messages=WEATHER_QUESTION, tools=TOOLS,
                                                tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                                seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert_valid_call(call)
    result = "22 degrees, sunny"
    history = WEATHER_QUESTION + [choice.message.model_dump(exclude_none=True),
                                  {"role": "tool", "tool_call_id": call.id, "content": result}]
    answer, question = (tool_client.chat.completions.create(model="", messages=messages, tools=TOOLS,
                                                            tool_choice="none", max_tokens=8, seed=1)
                        for messages in (history, WEATHER_QUESTION))
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    # The call and its result are in the prompt now.
    grown = answer.usage.prompt_tokens - question.usage.prompt_tokens
    assert grown > len(smol_tokenizer.encode(call.function.arguments + result, add_special_tokens=False))


def test_a_named_tool_choice_calls_that_function(tool_client):
    reply = tool_client.chat.completions.create(
        model="", messages=WEATHER_QUESTION, tools=TOOLS, max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert_valid_call(call)


def test_tool_choice_none_and_auto(tool_client):
    none = tool_client.chat.completions.create(model="", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="none",
                                               max_tokens=8, seed=2)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    auto = tool_client.chat.completions.create(model="", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="auto",
                                               max_tokens=8, seed=2).choices[0]
    # A random-weight model rarely calls on its own; whatever it does must be consistent.
    assert (auto.finish_reason == "tool_calls") == bool(auto.message.tool_calls)
    for call in auto.message.tool_calls or []:
        assert_valid_call(call)


# ---- completions, models, embeddings, tokenizer routes ---------------------------------------------------


def complete(client: OpenAI, prompt: Any, **fields: Any) -> Any:
    return client.completions.create(model="", prompt=prompt, max_tokens=8, temperature=0, **fields)


def test_completions_take_text_token_ids_and_lists(client, smol_tokenizer):
    text_prompt, other = "Once upon a time", "The capital of France is"
    by_text = complete(client, text_prompt)
    ids = smol_tokenizer.encode(text_prompt)
    by_ids = complete(client, ids)
    assert by_text.object == "text_completion" and by_text.choices[0].finish_reason == "length"
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.usage.completion_tokens == 8
    both = complete(client, [text_prompt, other])
    assert [choice.index for choice in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.choices[1].text == complete(client, other).choices[0].text
    assert both.usage.prompt_tokens == len(ids) + len(smol_tokenizer.encode(other))


@pytest.mark.parametrize("field", [{"echo": True}, {"suffix": "The end."}], ids=["echo", "suffix"])
def test_unsupported_completion_fields_are_a_400(client, field):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, "Once upon a time", **field)
    assert info.value.body["param"] == next(iter(field))


def test_models_list_and_retrieve(client, served_name):
    [model] = client.models.list().data
    assert model.id == served_name and model.object == "model"
    assert client.models.retrieve(served_name).id == served_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


EMBED_INPUTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "The cat sat on the mat."]


def test_float_embeddings_are_indexed_unit_vectors(client, smol_tokenizer):
    reply = client.embeddings.create(model="", input=EMBED_INPUTS, encoding_format="float")
    assert [item.index for item in reply.data] == [0, 1, 2]
    vectors = [item.embedding for item in reply.data]
    assert len({len(vector) for vector in vectors}) == 1 and len(vectors[0]) > 1
    assert all(math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-4) for vector in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5) and vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert reply.usage.prompt_tokens == sum(len(smol_tokenizer.encode(text)) for text in EMBED_INPUTS)


def test_base64_embeddings_decode_to_the_float_ones(client):
    floats = client.embeddings.create(model="", input=EMBED_INPUTS[:2], encoding_format="float")
    raw = client.embeddings.with_raw_response.create(model="", input=EMBED_INPUTS[:2])  # the client asks for base64
    assert all(isinstance(item["embedding"], str) for item in raw.http_response.json()["data"])
    decoded = raw.parse()
    assert [item.index for item in decoded.data] == [0, 1]
    for got, want in zip(decoded.data, floats.data):
        assert got.embedding == pytest.approx(want.embedding, rel=1e-6, abs=1e-7)


def test_tokenize_and_detokenize(http: httpx.Client, greedy, smol_tokenizer):
    text = "Hello world, nitro!"
    tokenized = http.post("/tokenize", json={"model": "", "prompt": text}).json()
    assert tokenized["tokens"] == smol_tokenizer(text)["input_ids"] and tokenized["count"] == len(tokenized["tokens"])
    chat_prompt = http.post("/tokenize", json={"model": "", "messages": HELLO}).json()
    assert chat_prompt["count"] == greedy.usage.prompt_tokens
    assert http.post("/detokenize", json={"model": "", "tokens": tokenized["tokens"]}).json()["prompt"] == text
