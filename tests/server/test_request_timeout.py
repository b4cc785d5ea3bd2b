"""--request-timeout through the API: the answer so far, finish_reason 'length', usage that counts it."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from nitro_torch.config import build_config
from nitro_torch.engine.client import start_engine_client
from nitro_torch.server.app import create_app

BODY = {"model": "", "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 900,
        "temperature": 0, "ignore_eos": True}


def test_timed_out_requests_end_with_length(tiny_model_dir: str) -> None:
    config = build_config({"model": tiny_model_dir, "device": "cpu", "num_kv_blocks": 128,
                           "request_timeout": 0.5}, env={})
    engine = start_engine_client(config)
    try:
        with TestClient(create_app(config, engine)) as client:
            answer = client.post("/v1/chat/completions", json=BODY).json()
            assert answer["choices"][0]["finish_reason"] == "length"
            assert 0 < answer["usage"]["completion_tokens"] < 900

            with client.stream("POST", "/v1/chat/completions",
                               json={**BODY, "stream": True, "stream_options": {"include_usage": True}}) as stream:
                events = [json.loads(line[6:]) for line in stream.iter_lines()
                          if line.startswith("data: {")]
            finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
            assert finishes == ["length"]
            assert 0 < events[-1]["usage"]["completion_tokens"] < 900
            assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()
