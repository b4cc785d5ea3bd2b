"""The HTTP layer over the real engine (in-process app, default model on CPU): response shapes, SSE, and
every error as an OpenAI body. Expected answers come from the real engine itself and the tokenizer."""

import json

import pytest

from nitro_torch.server.app import health_counters

from .helpers import HELLO as HELLO_MESSAGES
from .helpers import engine_reference, is_idle, template_ids, token_counts, wait_until_idle

HELLO = {"model": "", "messages": HELLO_MESSAGES}
GREEDY_HELLO = {**HELLO, "temperature": 0, "max_tokens": 16}
NITRO_TRAILING_COMMA = '{"model": "", "messages": [{"role": "user", "content": "Hello"},\n]}'
ARITHMETIC = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]
GENERIC_500 = "The server had an error while processing your request."


def assert_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def sse_payloads(text: str) -> list:
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(block[len("data: "):]) for block in events[:-1]]


def streamed_text(chunks: list) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk.get("choices"))


def test_non_streaming_shape(client, real_engine, tokenizer):
    response = client.post("/v1/chat/completions", json=GREEDY_HELLO)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == real_engine.model_name
    assert body["system_fingerprint"].startswith("fp_nitro_torch_")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    prompt_ids = template_ids(tokenizer, HELLO_MESSAGES)
    reference = engine_reference(real_engine, prompt_ids, temperature=0, max_tokens=16)
    assert reference.finish_reason == "stop"  # the default model answers "Hello" in fewer than 16 tokens
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": reference.text}
    assert reference.text and reference.text == tokenizer.decode(reference.token_ids, skip_special_tokens=True)
    assert reference.token_ids[-1] == tokenizer.eos_token_id  # the EOS counts as a completion token
    completion = len(reference.token_ids)
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                             "total_tokens": len(prompt_ids) + completion,
                             "prompt_tokens_details": body["usage"]["prompt_tokens_details"]}
    assert 0 <= body["usage"]["prompt_tokens_details"]["cached_tokens"] < len(prompt_ids)
    assert is_idle(real_engine.stats())


def test_length_finish_and_logprobs(client, real_engine, tokenizer):
    body = client.post("/v1/chat/completions", json={**GREEDY_HELLO, "max_tokens": 3, "logprobs": True,
                                                     "top_logprobs": 2}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    content = choice["logprobs"]["content"]
    assert len(content) == 3 and "".join(entry["token"] for entry in content) == choice["message"]["content"]
    assert all(bytes(entry["bytes"]).decode() == entry["token"] for entry in content)
    assert [len(entry["top_logprobs"]) for entry in content] == [2, 2, 2]
    for entry in content:  # greedy: the chosen token is the most likely one
        best, second = entry["top_logprobs"]
        assert (best["token"], best["logprob"]) == (entry["token"], entry["logprob"])
        assert 0.0 >= best["logprob"] >= second["logprob"]
    reference = engine_reference(real_engine, template_ids(tokenizer, HELLO_MESSAGES), temperature=0, max_tokens=3)
    assert choice["message"]["content"] == reference.text
    assert [entry["token"] for entry in content] == [tokenizer.decode([i]) for i in reference.token_ids]


def test_streaming_chunks(client):
    plain = client.post("/v1/chat/completions", json=GREEDY_HELLO).json()
    response = client.post("/v1/chat/completions",
                           json={**GREEDY_HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_chunks = chunks[1:-2]
    assert len(content_chunks) > 1 and all(chunk["choices"][0]["delta"]["content"] for chunk in content_chunks)
    assert streamed_text(chunks) == plain["choices"][0]["message"]["content"]
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert usage["choices"] == [] and token_counts(usage["usage"]) == token_counts(plain["usage"])


def test_streaming_without_usage_has_no_usage_key(client):
    chunks = sse_payloads(client.post("/v1/chat/completions",
                                      json={**GREEDY_HELLO, "max_tokens": 2, "stream": True}).text)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_and_health(client, real_engine):
    name = real_engine.model_name
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    assert models["data"][0]["id"] == name and models["data"][0]["owned_by"] == "nitro_torch"
    assert models["data"][0]["max_model_len"] == real_engine.max_model_len == 2048
    assert client.get(f"/v1/models/{name}").json()["id"] == name
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")
    health = client.get("/health").json()
    assert health == {"status": "ok", **health_counters(real_engine)}
    assert health["num_running"] == 0 and health["kv_blocks_used"] == 0 and health["kv_blocks_total"] > 0
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("raw, param", [
    (NITRO_TRAILING_COMMA, None),
    ("{", None),
    ("", None),
    ("[1, 2]", None),
    ('"just a string"', None),
    ('{"model": ""}', "messages"),
    ('{"messages": []}', "messages"),
    ('{"messages": [{"role": "user", "content": 1}]}', "messages.0.content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}', "max_tokens"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "n"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
])
def test_bad_requests_are_400(client, raw, param):
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_invalid_json_says_where(client):
    error = assert_error(client.post("/v1/chat/completions", content=NITRO_TRAILING_COMMA), 400)
    assert "line 2 column 1" in error["message"]


def test_n_message(client):
    error = assert_error(client.post("/v1/chat/completions", json={**HELLO, "n": 65}), 400, param="n")
    assert error["message"] == "'n' must be between 1 and 64"


def test_message_count_limit(client):
    many = [{"role": "user", "content": "hi"}] * 2049
    error = assert_error(client.post("/v1/chat/completions", json={**HELLO, "messages": many}), 400,
                         param="messages")
    assert "2048" in error["message"]


def test_stop_string_limit(client):
    error = assert_error(client.post("/v1/chat/completions", json={**HELLO, "stop": ["x"] * 17}), 400,
                         param="stop")
    assert "16" in error["message"]


def test_context_length(client, real_engine, tokenizer):
    window = real_engine.max_model_len
    room = window - len(template_ids(tokenizer, HELLO_MESSAGES))
    error = assert_error(client.post("/v1/chat/completions", json={**HELLO, "max_tokens": room + 1}), 400,
                         param="messages", code="context_length_exceeded")
    assert str(window + 1) in error["message"]
    # prompts of exactly window - 1 and window tokens (checked before any inference, so cheap)
    base = len(template_ids(tokenizer, [{"role": "user", "content": ""}]))
    almost_full = [{"role": "user", "content": " ".join(["word"] * (window - 1 - base))}]
    full = [{"role": "user", "content": " ".join(["word"] * (window - base))}]
    assert len(template_ids(tokenizer, almost_full)) == window - 1 and len(template_ids(tokenizer, full)) == window
    assert_error(client.post("/v1/chat/completions", json={"messages": full}), 400, param="messages",
                 code="context_length_exceeded")
    assert_error(client.post("/v1/chat/completions", json={"messages": almost_full, "max_tokens": 2}), 400,
                 param="messages", code="context_length_exceeded")
    assert is_idle(real_engine.stats())
    # exactly at the limit is fine (greedy "Hello" ends with EOS long before it)
    body = client.post("/v1/chat/completions", json={**HELLO, "max_tokens": room, "temperature": 0}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] <= window


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, code="unknown_url")
    error = assert_error(client.get("/v1/chat/completions"), 405)
    assert "POST" in error["message"]


class StepFailure:
    """Fault injection into the real engine: the model runner's `execute` raises once, on call `after + 1`."""

    def __init__(self, engine, monkeypatch) -> None:
        runner = engine.core.runner
        self._original = runner.execute
        self._countdown: int | None = None
        self.raised = 0
        monkeypatch.setattr(runner, "execute", self._execute)

    def arm(self, after: int) -> None:
        self._countdown = after

    def _execute(self, *args, **kwargs):
        if self._countdown is not None:
            if self._countdown == 0:
                self._countdown = None
                self.raised += 1
                raise RuntimeError("/secret/path/x.py exploded")
            self._countdown -= 1
        return self._original(*args, **kwargs)


def test_engine_failure_is_a_clean_500_and_server_goes_on(thread_client, thread_engine, tokenizer, monkeypatch):
    reference = engine_reference(thread_engine, template_ids(tokenizer, HELLO_MESSAGES), temperature=0, max_tokens=16)
    failure = StepFailure(thread_engine, monkeypatch)

    failure.arm(after=2)
    response = thread_client.post("/v1/chat/completions", json=GREEDY_HELLO)
    error = assert_error(response, 500, code="internal_error")
    assert failure.raised == 1
    assert error["type"] == "server_error" and error["message"] == GENERIC_500
    for leak in ("secret", "Traceback", "exploded", ".py"):
        assert leak not in response.text
    assert is_idle(wait_until_idle(thread_engine))  # the failed request gave its KV blocks back

    failure.arm(after=2)
    response = thread_client.post("/v1/chat/completions", json={**GREEDY_HELLO, "stream": True})
    assert failure.raised == 2
    chunks = sse_payloads(response.text)
    assert chunks[-1]["error"]["type"] == "server_error" and chunks[-1]["error"]["message"] == GENERIC_500
    partial = streamed_text(chunks[:-1])
    assert partial and reference.text.startswith(partial) and partial != reference.text
    assert "secret" not in response.text and "exploded" not in response.text
    assert is_idle(wait_until_idle(thread_engine))

    response = thread_client.post("/v1/chat/completions", json=GREEDY_HELLO)
    assert response.status_code == 200 and failure.raised == 2
    assert response.json()["choices"][0]["message"]["content"] == reference.text


def test_eos_text_is_not_content_unless_asked(client):
    """skip_special_tokens=false renders special tokens, but the EOS that ends the answer is not content
    unless include_stop_str_in_output is true."""
    request = {"messages": ARITHMETIC, "temperature": 0, "max_tokens": 16}
    plain = client.post("/v1/chat/completions", json=request).json()
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["choices"][0]["message"]["content"]
    answer = plain["choices"][0]["message"]["content"]

    raw = client.post("/v1/chat/completions", json={**request, "skip_special_tokens": False}).json()
    assert raw["choices"][0]["finish_reason"] == "stop"
    assert not raw["choices"][0]["message"]["content"].endswith("<|im_end|>")
    assert raw["choices"][0]["message"]["content"] == answer and token_counts(raw["usage"]) == token_counts(plain["usage"])
    chunks = sse_payloads(client.post("/v1/chat/completions",
                                      json={**request, "skip_special_tokens": False, "stream": True}).text)
    assert streamed_text(chunks) == answer

    with_stop = client.post("/v1/chat/completions", json={**request, "skip_special_tokens": False,
                                                          "include_stop_str_in_output": True}).json()
    assert with_stop["choices"][0]["message"]["content"] in (answer, answer + "<|im_end|>")
    assert token_counts(with_stop["usage"]) == token_counts(plain["usage"])


def test_logit_bias_steers_the_real_model(client, tokenizer):
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    body = client.post("/v1/chat/completions", json={**GREEDY_HELLO, "max_tokens": 3, "ignore_eos": True,
                                                     "logit_bias": {str(forced): 100}}).json()
    assert body["choices"][0]["message"]["content"] == tokenizer.decode([forced] * 3)
    plain = client.post("/v1/chat/completions", json={**GREEDY_HELLO, "max_tokens": 3}).json()
    first = tokenizer.encode(plain["choices"][0]["message"]["content"], add_special_tokens=False)[0]
    banned = client.post("/v1/chat/completions", json={**GREEDY_HELLO, "max_tokens": 3, "logprobs": True,
                                                       "logit_bias": {str(first): -100}}).json()
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != tokenizer.decode([first])


@pytest.mark.parametrize("bias", [{"99999999": 1}, {"x": 1}, {"5": 1000}])
def test_bad_logit_bias_is_a_400_naming_it(client, bias):
    assert_error(client.post("/v1/chat/completions", json={**GREEDY_HELLO, "logit_bias": bias}), 400,
                 param="logit_bias")
