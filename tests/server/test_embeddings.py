"""POST /v1/embeddings over the real default model: the official openai client in both encodings, every input
form with its own index, agreement with HF's own forward of the model, and errors."""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid

import openai
import pytest
import torch
import torch.nn.functional as F

from nitro_torch.sampling import SamplingParams

from .helpers import engine_reference

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Bonjour, comment ça va ? 😀"]


def assert_error(response, status: int, param: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def embed(client, input, **extra) -> dict:
    response = client.post("/v1/embeddings", json={"model": "", "input": input, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def vectors(body: dict) -> torch.Tensor:
    return torch.tensor([item["embedding"] for item in body["data"]], dtype=torch.float64)


@pytest.fixture(scope="module")
def hf_reference(default_model_dir):
    """The default model through plain HF (eager attention, one input at a time): mean-pooled, normalised."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return F.normalize(hidden.double().mean(dim=0), dim=-1)

    return reference


def test_openai_client_float_and_base64(threaded_server, tokenizer):
    client = openai.OpenAI(base_url=threaded_server.api_url, api_key="unused", max_retries=0, timeout=120)
    floats = client.embeddings.create(model="", input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == threaded_server.engine.model_name
    assert [item.index for item in floats.data] == [0, 1, 2]
    hidden_size = threaded_server.engine.info.embedding_size
    assert all(item.object == "embedding" and len(item.embedding) == hidden_size for item in floats.data)
    num_tokens = sum(len(tokenizer.encode(text)) for text in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == num_tokens
    # Without encoding_format the client asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model="", input=TEXTS)
    assert [item.embedding for item in decoded.data] == [item.embedding for item in floats.data]
    raw = client.embeddings.create(model="", input=TEXTS, encoding_format="base64")
    for item, expected in zip(raw.data, floats.data):
        assert isinstance(item.embedding, str)
        assert list(struct.unpack(f"<{hidden_size}f", base64.b64decode(item.embedding))) == expected.embedding


def test_embeddings_match_hf_forward_of_the_model(client, tokenizer, hf_reference):
    got = vectors(embed(client, TEXTS))
    for text, vector in zip(TEXTS, got):
        torch.testing.assert_close(vector, hf_reference(tokenizer.encode(text)), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS), dtype=torch.float64))


def test_every_input_form_gets_its_own_index(client, real_engine, tokenizer):
    token_lists = [tokenizer.encode(text) for text in TEXTS]
    batch = embed(client, TEXTS)
    by_ids = embed(client, token_lists)
    assert [item["index"] for item in by_ids["data"]] == [0, 1, 2]
    assert vectors(by_ids).equal(vectors(batch))  # token ids and their text: the same forward
    single_text = embed(client, TEXTS[0])
    single_ids = embed(client, token_lists[0])
    assert len(single_text["data"]) == 1 and single_text["data"][0]["index"] == 0
    assert single_text["data"] == single_ids["data"]
    assert single_text["usage"] == {"prompt_tokens": len(token_lists[0]), "total_tokens": len(token_lists[0])}
    # Packed with others or alone: the same vector up to float rounding; the same request: the same bits.
    torch.testing.assert_close(vectors(single_text)[0], vectors(batch)[0], atol=1e-5, rtol=1e-5)
    assert embed(client, TEXTS[0]) == single_text
    assert len({tuple(v.tolist()) for v in vectors(batch)}) == len(TEXTS)
    assert embed(client, "x", dimensions=real_engine.info.embedding_size)["data"]  # the model's own size is fine


def test_embedding_while_generating_changes_neither(real_engine, tokenizer):
    prompt_ids = tokenizer.encode("Once upon a time")
    params = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
    expected_tokens = engine_reference(real_engine, prompt_ids, **params).token_ids
    token_lists = [tokenizer.encode(text) for text in TEXTS]

    async def run() -> tuple[list[int], list[list[float]], list[list[float]]]:
        alone = await real_engine.embed(token_lists)

        async def generate() -> list[int]:
            ids = []
            async for output in real_engine.generate(f"gen-{uuid.uuid4().hex}", prompt_ids,
                                                     SamplingParams(**params)):
                ids.extend(output.new_token_ids)
            return ids

        generation = asyncio.ensure_future(generate())
        await asyncio.sleep(0.2)
        during = await real_engine.embed(token_lists)
        return await generation, alone, during

    generated, alone, during = asyncio.run(run())
    assert generated == expected_tokens
    assert during == alone


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [""]}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": ["a", 1]}, "input"),
    ({"input": [[1], 2]}, "input"),
    ({"input": [True]}, "input"),
    ({"input": [10**9]}, "input"),
    ({"input": [[-1]]}, "input"),
    ({}, "input"),
    ({"input": "hi", "dimensions": 3}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_requests_are_400_naming_the_field(client, body, param):
    assert_error(client.post("/v1/embeddings", json=body), 400, param)


def test_input_longer_than_the_context(client, real_engine):
    limit = real_engine.max_model_len
    assert embed(client, [5] * limit)["usage"]["prompt_tokens"] == limit
    error = assert_error(client.post("/v1/embeddings", json={"input": [[5, 6], [5] * (limit + 1)]}), 400, "input",
                         "context_length_exceeded")
    assert str(limit) in error["message"] and "input 1" in error["message"]


def test_unknown_model_is_404_with_strict_model_name(strict_client):
    assert_error(strict_client.post("/v1/embeddings", json={"model": "no-such-model", "input": "hi"}), 404, "model")
