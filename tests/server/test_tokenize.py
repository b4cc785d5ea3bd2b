"""POST /tokenize and /detokenize (vLLM's shapes) over the real default model's tokenizer."""

from __future__ import annotations

import pytest

from .helpers import HELLO, template_ids

TEXT = "Hello world, naïve café 😀!"


def assert_error(response, status: int, param: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error


def test_tokenize_a_prompt(client, real_engine, tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    body = client.post("/tokenize", json={"model": "", "prompt": TEXT}).json()
    assert body == {"count": len(ids), "max_model_len": real_engine.max_model_len, "tokens": ids}
    with_strs = client.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True,
                                               "add_special_tokens": False}).json()
    assert with_strs["tokens"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert with_strs["token_strs"] == tokenizer.convert_ids_to_tokens(with_strs["tokens"])


def test_tokenize_messages_is_the_chat_prompt(client, tokenizer):
    body = client.post("/tokenize", json={"messages": HELLO}).json()
    assert body["tokens"] == template_ids(tokenizer, HELLO) and body["count"] == len(body["tokens"])
    chat = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    without = client.post("/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    expected = tokenizer.apply_chat_template(HELLO, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert without["tokens"] == list(expected) and without["count"] < body["count"]


def test_detokenize_round_trip(client, tokenizer):
    ids = client.post("/tokenize", json={"prompt": TEXT}).json()["tokens"]
    assert client.post("/detokenize", json={"model": "", "tokens": ids}).json() == {"prompt": TEXT}
    eos = tokenizer.eos_token_id
    assert client.post("/detokenize", json={"tokens": [eos]}).json() == {"prompt": tokenizer.eos_token}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("tokens", [[1, 10**9], [-1], ["a"], [True], "1 2", None])
def test_detokenize_refuses_what_is_not_a_token_id(client, tokens):
    assert_error(client.post("/detokenize", json={"tokens": tokens}), 400, "tokens")


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
])
def test_tokenize_bad_requests(client, body, param):
    assert_error(client.post("/tokenize", json=body), 400, param)


def test_unknown_model_is_404_with_strict_model_name(strict_client):
    assert_error(strict_client.post("/tokenize", json={"model": "no-such-model", "prompt": "hi"}), 404, "model")
    assert_error(strict_client.post("/detokenize", json={"model": "no-such-model", "tokens": [1]}), 404, "model")
