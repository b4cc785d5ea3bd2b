"""Replicas are stateless: two `nitro-torch serve` processes on the same model answer the same requests alike,
so a Service may send any request to either of them."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import server_process

pytestmark = pytest.mark.slow

CHATS = [
    {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 24, "temperature": 0},
    {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"}],
     "max_tokens": 16, "temperature": 0.9, "seed": 7},
    {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12, "temperature": 0.7,
     "top_p": 0.9, "seed": 3, "n": 2},
]
OPTIONS = ("--max-model-len", "1024", "--kv-cache-memory", "0.1", "--max-num-seqs", "8", "--log-level", "warning")


def answers(base_url: str) -> list[tuple[list[str], dict]]:
    out = []
    for chat in CHATS:
        response = httpx.post(base_url + "/v1/chat/completions", json=chat, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}  # cache hits differ
        out.append(([c["message"]["content"] for c in body["choices"]], usage))
    return out


def test_two_replicas_answer_alike() -> None:
    with server_process(*OPTIONS) as (_, first, _), server_process(*OPTIONS) as (_, second, _):
        from_first, from_second = answers(first), answers(second)
        assert from_first == from_second
        assert answers(second) == from_first  # and a replica that served before answers as a fresh one
    assert all(contents and all(contents) for contents, _ in from_first)
