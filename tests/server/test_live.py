"""End to end against `nitro-torch serve` on the real default model (CPU: keep max_tokens small)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from .helpers import token_counts

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello"}]
DODGERS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who won the world series in 2020?"},
    {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
    {"role": "user", "content": "Where was it played?"},
]
NITRO_SINGLE_EXAMPLE = '{\n    "model": "",\n    "messages": [\n      {\n        "role": "user",\n' \
                       '        "content": "Hello"\n      },\n    ]\n  }'
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.api_url, api_key="unused", max_retries=0, timeout=120)


def template_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def greedy(client, messages, **extra):
    extra.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model="", messages=messages, temperature=0, **extra)


def health(live_server) -> dict:
    return httpx.get(live_server.base_url + "/health", timeout=10).json()


def wait_until_idle(live_server, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    stats = health(live_server)
    while (stats["num_running"] or stats["num_waiting"] or stats["kv_blocks_used"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = health(live_server)
    return stats


@pytest.mark.parametrize("messages", [HELLO, DODGERS], ids=["single", "dialog"])
def test_nitro_examples_with_exact_usage(client, tokenizer, messages):
    completion = greedy(client, messages, logprobs=True)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.created > 0 and completion.model and completion.system_fingerprint
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens == len(template_ids(tokenizer, messages))
    tokens = choice.logprobs.content
    assert usage.completion_tokens == len(tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "stop":
        assert tokens[-1].token == tokenizer.eos_token  # the EOS counts as a completion token
        assert "".join(t.token for t in tokens[:-1]) == choice.message.content
        assert usage.completion_tokens == len(tokenizer.encode(choice.message.content,
                                                               add_special_tokens=False)) + 1
    else:
        assert usage.completion_tokens == MAX_TOKENS
        assert "".join(t.token for t in tokens) == choice.message.content
    plain = greedy(client, messages)
    assert plain.choices[0].message.content == choice.message.content
    assert token_counts(plain.usage) == token_counts(usage)


def test_raw_nitro_requests(live_server):
    url = live_server.api_url + "/chat/completions"
    broken = httpx.post(url, content=NITRO_SINGLE_EXAMPLE, headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and "line 8" in broken.json()["error"]["message"]
    dialog = httpx.post(url, json={"messages": DODGERS, "max_tokens": 4}, timeout=60)  # no "model" at all
    assert dialog.status_code == 200 and dialog.json()["usage"]["completion_tokens"] <= 4


def test_streaming_equals_non_streaming(client):
    plain = greedy(client, DODGERS)
    chunks = list(greedy(client, DODGERS, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    finals = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and token_counts(chunks[-1].usage) == token_counts(plain.usage)


def test_concurrent_requests_match_sequential(live_server, client):
    prompts = [[{"role": "user", "content": f"Name {i + 1} fruit{'s' if i else ''} and say why you like them."}]
               if i % 2 else [{"role": "user", "content": f"What is {i} plus {i + 3}?"}] for i in range(16)]
    sequential = [greedy(client, messages, max_tokens=12).choices[0].message.content for messages in prompts]

    async def all_at_once() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=live_server.api_url, api_key="unused", max_retries=0,
                                          timeout=120)
        async with async_client:
            results = await asyncio.gather(*(
                async_client.chat.completions.create(model="", messages=messages, temperature=0, max_tokens=12)
                for messages in prompts))
        return [result.choices[0].message.content for result in results]

    assert asyncio.run(all_at_once()) == sequential


@pytest.mark.parametrize("body, param, code", [
    ({"messages": []}, "messages", None),
    ({"model": ""}, "messages", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", None),
    ({"messages": HELLO, "n": 0}, "n", None),
    ({"messages": HELLO, "temperature": "hot"}, "temperature", None),
    ({"messages": HELLO, "max_tokens": 10**6}, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hello " * 2100}]}, "messages", "context_length_exceeded"),
])
def test_errors_then_normal_service(live_server, client, body, param, code):
    response = httpx.post(live_server.api_url + "/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code
    assert greedy(client, HELLO, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_routes_and_methods(live_server):
    assert httpx.get(live_server.base_url + "/nope").status_code == 404
    assert httpx.get(live_server.api_url + "/chat/completions").status_code == 405
    assert httpx.get(live_server.base_url + "/healthz").status_code == 200
    models = httpx.get(live_server.api_url + "/models").json()
    assert len(models["data"]) == 1 and models["data"][0]["owned_by"] == "nitro_torch"


def test_disconnects_abort_and_free_blocks(live_server):
    long_run = {"messages": HELLO, "max_tokens": 1000, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live_server.api_url + "/chat/completions",
                         json={**long_run, "stream": True}) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                next(events)
            assert health(live_server)["num_running"] == 1
    stats = wait_until_idle(live_server)
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.api_url + "/chat/completions", json=long_run, timeout=1.5)
    stats = wait_until_idle(live_server)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0
