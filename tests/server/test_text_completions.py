"""POST /v1/completions over the real engine (default model, CPU): answers equal the engine driven directly,
prompts in every OpenAI form, n choices per prompt, SSE, the official openai client, errors, disconnects."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .helpers import engine_reference, is_idle, wait_until_idle

PROMPT = "The capital of France is"
GREEDY = {"model": "", "temperature": 0, "max_tokens": 8}
# ~200 decode steps take far longer on CPU than a test waits: if the request is not aborted, it is still running.
LONG_RUN = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def assert_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def sse_payloads(text: str) -> list[dict]:
    events = [block for block in text.split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    return [json.loads(block[len("data: "):]) for block in events[:-1]]


def test_greedy_completion_equals_the_engine(client, real_engine, tokenizer):
    response = client.post("/v1/completions", json={**GREEDY, "prompt": PROMPT})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == real_engine.model_name and isinstance(body["created"], int)
    prompt_ids = tokenizer.encode(PROMPT)
    reference = engine_reference(real_engine, prompt_ids, temperature=0, max_tokens=8)
    assert body["choices"] == [{"text": reference.text, "index": 0, "logprobs": None,
                                "finish_reason": reference.finish_reason}]
    assert reference.text.startswith(" ")  # the continuation of a prompt keeps its leading space
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt_ids), reference.num_output_tokens)
    assert usage["total_tokens"] == len(prompt_ids) + reference.num_output_tokens


def test_max_tokens_defaults_to_16(client):
    body = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"


def test_prompt_ending_mid_word_continues_the_word(client, real_engine, tokenizer):
    prompt = "Once upon a ti"
    prompt_ids = tokenizer.encode(prompt)
    text = client.post("/v1/completions", json={**GREEDY, "prompt": prompt}).json()["choices"][0]["text"]
    reference = engine_reference(real_engine, prompt_ids, temperature=0, max_tokens=8)
    whole = tokenizer.decode(prompt_ids + reference.token_ids, skip_special_tokens=True)
    assert text == reference.text == whole[len(prompt):]


def test_every_prompt_form_and_n_choices_per_prompt(client, real_engine, tokenizer):
    texts = ["Hello, my name is", "1, 2, 3,"]
    token_lists = [tokenizer.encode(t) for t in texts]
    references = [engine_reference(real_engine, ids, temperature=0, max_tokens=8) for ids in token_lists]
    for prompt in (texts, token_lists):
        body = client.post("/v1/completions", json={**GREEDY, "prompt": prompt, "n": 2}).json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        for choice in body["choices"]:
            reference = references[choice["index"] // 2]
            assert (choice["text"], choice["finish_reason"]) == (reference.text, reference.finish_reason)
        usage = body["usage"]
        assert usage["prompt_tokens"] == sum(len(ids) for ids in token_lists)  # once per prompt, not per choice
        assert usage["completion_tokens"] == 2 * sum(r.num_output_tokens for r in references)
    for prompt in (texts[1], token_lists[1]):  # one prompt: a string or one list of token ids
        body = client.post("/v1/completions", json={**GREEDY, "prompt": prompt}).json()
        assert body["choices"][0]["text"] == references[1].text
        assert body["usage"]["prompt_tokens"] == len(token_lists[1])


def test_seeded_choices_are_reproducible_and_differ(client):
    request = {"prompt": "My favourite colour is", "n": 3, "seed": 1234, "temperature": 1.0, "max_tokens": 12,
               "ignore_eos": True}
    first = [c["text"] for c in client.post("/v1/completions", json=request).json()["choices"]]
    again = [c["text"] for c in client.post("/v1/completions", json=request).json()["choices"]]
    assert first == again
    assert len(set(first)) > 1
    single = client.post("/v1/completions", json={**request, "n": 1}).json()["choices"][0]["text"]
    assert single == first[0]


def test_stop_strings_and_sampling_extras(client, real_engine, tokenizer):
    prompt_ids = tokenizer.encode("1, 2, 3, 4,")
    full = engine_reference(real_engine, prompt_ids, temperature=0, max_tokens=12, ignore_eos=True)
    stop = full.text.strip()[:2]  # a stop string the greedy continuation does contain
    assert stop and stop in full.text
    body = client.post("/v1/completions", json={**GREEDY, "prompt": prompt_ids, "max_tokens": 12, "stop": stop,
                                                "ignore_eos": True, "top_k": 1, "repetition_penalty": 1.0}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full.text[:full.text.index(stop)]


def test_streaming_equals_plain_with_usage_last(client):
    request = {**GREEDY, "prompt": ["Hello, my name is", "1, 2, 3,"], "n": 2}
    plain = client.post("/v1/completions", json=request).json()
    response = client.post("/v1/completions", json={**request, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    texts, reasons = [""] * 4, [None] * 4
    for chunk in chunks[:-1]:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            reasons[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in plain["choices"]]
    assert reasons == [c["finish_reason"] for c in plain["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    without_usage = sse_payloads(client.post("/v1/completions", json={**request, "stream": True}).text)
    assert all("usage" not in chunk for chunk in without_usage)


@pytest.mark.parametrize("field,value", [("echo", True), ("logprobs", 2), ("logprobs", 0), ("suffix", "!"),
                                         ("best_of", 3)])
def test_unsupported_options_are_400_naming_them(client, field, value):
    error = assert_error(client.post("/v1/completions", json={"prompt": PROMPT, field: value}), 400, field)
    assert "not supported" in error["message"]


@pytest.mark.parametrize("extra,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [1, [2]]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "n": 1000}, "n"),
    ({"prompt": PROMPT, "temperature": 3}, "temperature"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "best_of": 1, "n": 2}, "best_of"),
    ({"prompt": PROMPT, "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": PROMPT, "logit_bias": {"x": 1}}, "logit_bias"),
])
def test_bad_requests_are_errors_naming_the_field(client, extra, param):
    assert_error(client.post("/v1/completions", json=extra), 400, param)


def test_unknown_model_is_404_with_strict_model_name(strict_client):
    assert_error(strict_client.post("/v1/completions", json={"prompt": PROMPT, "model": "no-such-model"}), 404, "model")


def test_context_length_is_checked_per_prompt(client, real_engine):
    limit = real_engine.max_model_len
    error = assert_error(client.post("/v1/completions", json={"prompt": [[1, 2], [5] * limit], "max_tokens": 1}),
                         400, "prompt", "context_length_exceeded")
    assert str(limit) in error["message"] and "Prompt 1" in error["message"]
    assert_error(client.post("/v1/completions", json={"prompt": [5] * (limit - 4), "max_tokens": 5}), 400,
                 "prompt", "context_length_exceeded")


def test_openai_client(threaded_server, tokenizer):
    client = openai.OpenAI(base_url=threaded_server.api_url, api_key="unused", max_retries=0, timeout=120)
    completion = client.completions.create(model="", prompt=PROMPT, temperature=0, max_tokens=8)
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    stream = client.completions.create(model="", prompt=PROMPT, temperature=0, max_tokens=8, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage == completion.usage
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="", prompt=PROMPT, echo=True)
    assert info.value.body["param"] == "echo"


def test_non_streaming_disconnect_aborts_every_choice(threaded_server):
    engine = threaded_server.engine
    assert is_idle(wait_until_idle(engine))
    steps_before = engine.stats().num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(threaded_server.api_url + "/completions", json={**LONG_RUN, "prompt": [PROMPT, "Hi"], "n": 2},
                   timeout=2)
    stats = wait_until_idle(engine)
    assert is_idle(stats), stats
    assert 1 <= stats.num_steps - steps_before < LONG_RUN["max_tokens"]


def test_streaming_disconnect_aborts_every_choice(threaded_server):
    engine = threaded_server.engine
    assert is_idle(wait_until_idle(engine))
    request = {**LONG_RUN, "n": 3, "stream": True}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", threaded_server.api_url + "/completions", json=request) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(4):
            next(events)
        assert engine.stats().num_running == 3
    stats = wait_until_idle(engine)
    assert is_idle(stats), stats
