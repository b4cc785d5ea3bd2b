import pytest
from pydantic import ValidationError

from nitro_torch.sampling import SamplingParamsError
from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.http.errors import validation_error

USER_HELLO = [{"role": "user", "content": "Hello"}]


def parse(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER_HELLO, **fields})


def error_param(data: dict) -> str | None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(data)
    return validation_error(info.value).param


def test_defaults_follow_openai():
    request = parse()
    params = request.to_sampling_params()
    assert request.model == "" and request.stream is False and not request.include_usage
    assert params.max_tokens is None  # up to the context window
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.logprobs is None and params.stop == [] and params.skip_special_tokens


def test_fields_map_to_sampling_params():
    params = parse(max_tokens=7, temperature=0, top_p=0.5, top_k=-1, min_p=0.1, seed=3, presence_penalty=0.5,
                   frequency_penalty=-0.5, repetition_penalty=1.2, stop="END", stop_token_ids=[5],
                   ignore_eos=True, min_tokens=2, logprobs=True, top_logprobs=3,
                   include_stop_str_in_output=True, skip_special_tokens=False).to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p) == (7, 0, 0.5, 0, 0.1)
    assert (params.seed, params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        3, 0.5, -0.5, 1.2)
    assert params.stop == ["END"] and params.stop_token_ids == [5] and params.ignore_eos
    assert params.min_tokens == 2 and params.logprobs == 3
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert parse(logprobs=True).to_sampling_params().logprobs == 0
    assert parse(stop=["a", "b"]).to_sampling_params().stop == ["a", "b"]


def test_max_completion_tokens_wins_and_names_itself_in_errors():
    assert parse(max_tokens=5, max_completion_tokens=9).to_sampling_params().max_tokens == 9
    with pytest.raises(SamplingParamsError) as info:
        parse(max_completion_tokens=0).to_sampling_params()
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(SamplingParamsError) as info:
        parse(max_tokens=0).to_sampling_params()
    assert info.value.param == "max_tokens"


@pytest.mark.parametrize("fields, param", [
    ({"n": 65}, "n"), ({"n": 0}, "n"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"seed": 2**70}, "seed"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"), ({"stop": [""]}, "stop"),
])
def test_out_of_range_values_name_their_param(fields, param):
    with pytest.raises(SamplingParamsError) as info:
        parse(**fields).to_sampling_params()
    assert info.value.param == param


def test_n_up_to_the_limit_is_accepted():
    assert parse(n=64).num_choices == 64


def test_extra_fields_and_nulls_are_tolerated():
    request = parse(model="gpt-4o", foo={"bar": 1}, temperature=None, n=None, stream_options=None,
                    logit_bias=None, response_format={"type": "text"})
    assert request.to_sampling_params().temperature == 1.0


def test_content_parts_and_roles_are_kept_for_the_template():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]})
    assert request.messages[0].content == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]


@pytest.mark.parametrize("data, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages.0"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
    ({"messages": USER_HELLO, "max_tokens": "many"}, "max_tokens"),
    ({"messages": USER_HELLO, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": USER_HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": USER_HELLO, "stop": 3}, "stop"),
    ({"messages": USER_HELLO, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"messages": USER_HELLO, "model": 12}, "model"),
])
def test_validation_errors_carry_the_dotted_field_path(data, param):
    assert error_param(data) == param


def test_include_usage_only_when_streaming():
    assert parse(stream=True, stream_options={"include_usage": True}).include_usage
    assert not parse(stream=False, stream_options={"include_usage": True}).include_usage


def test_logit_bias_keys_are_token_id_strings():
    assert parse(logit_bias={"12": 5, "7": -100}).to_sampling_params().logit_bias == {12: 5.0, 7: -100.0}
    with pytest.raises(SamplingParamsError) as info:
        parse(logit_bias={"hello": 1}).to_sampling_params()
    assert info.value.param == "logit_bias"
    with pytest.raises(SamplingParamsError) as info:
        parse(logit_bias={"3": 101}).to_sampling_params()
    assert info.value.param == "logit_bias"


# ---- through HTTP: what OpenAI answers 400 to ---------------------------------------------------------------

CHAT = "/v1/chat/completions"
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}


def error_of(response) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("path, fields, param", [
    (CHAT, {"stream": "yes"}, "stream"),
    (CHAT, {"stream": "true"}, "stream"),
    (CHAT, {"stream": 1}, "stream"),
    (CHAT, {"logprobs": "yes"}, "logprobs"),
    (CHAT, {"ignore_eos": "on"}, "ignore_eos"),
    (CHAT, {"skip_special_tokens": 0}, "skip_special_tokens"),
    (CHAT, {"include_stop_str_in_output": "no"}, "include_stop_str_in_output"),
    (CHAT, {"add_generation_prompt": "no"}, "add_generation_prompt"),
    (CHAT, {"continue_final_message": "yes"}, "continue_final_message"),
    (CHAT, {"parallel_tool_calls": "false"}, "parallel_tool_calls"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
])
def test_flags_must_be_json_booleans(client, path, fields, param):
    body = {"messages": USER_HELLO} if path == CHAT else {"prompt": "Hello"}
    error = error_of(client.post(path, json={**body, "max_tokens": 1, **fields}))
    assert error["param"] == param and "boolean" in error["message"]


@pytest.mark.parametrize("messages, code", [
    ([{"role": "user"}], "missing_required_parameter"),
    ([{"role": "user", "content": None}], "invalid_value"),
    ([{"role": "system"}, *USER_HELLO], "missing_required_parameter"),
    ([{"role": "developer", "content": None}, *USER_HELLO], "invalid_value"),
])
def test_messages_other_than_the_assistants_need_content(client, messages, code):
    error = error_of(client.post(CHAT, json={"messages": messages, "max_tokens": 1}))
    assert error["param"] == "messages.0.content" and error["code"] == code


def test_a_tool_message_needs_content(client):
    messages = [*USER_HELLO, {"role": "assistant", "tool_calls": [TOOL_CALL]}, {"role": "tool", "tool_call_id": "c1"}]
    assert error_of(client.post(CHAT, json={"messages": messages, "max_tokens": 1}))["param"] == "messages.2.content"


@pytest.mark.parametrize("assistant", [
    {"role": "assistant", "tool_calls": [TOOL_CALL]},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
])
def test_assistant_tool_calls_without_content_are_accepted(client, assistant):
    messages = [*USER_HELLO, assistant, {"role": "tool", "content": "2", "tool_call_id": "c1"}]
    assert client.post(CHAT, json={"messages": messages, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path", [CHAT, "/inferences/llamacpp/chat_completion"])
def test_real_booleans_and_nitros_own_fields_are_accepted(client, path):
    response = client.post(path, json={
        "messages": USER_HELLO, "max_tokens": 2, "stream": False, "logprobs": False, "ignore_eos": True,
        "min_tokens": 1, "skip_special_tokens": True, "include_stop_str_in_output": False,
        "add_generation_prompt": True, "continue_final_message": False, "stream_options": None,
        "parallel_tool_calls": None, "engine": "cortex.llamacpp", "stop": ["USER:"], "model": ""})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
