"""Grammars a hostile client sends, against `nitro-torch serve` on the default model: none may hold the event
loop (a second client polls /health throughout), too deep or too slow ones are a 400 naming the field (their
repeats answered from the verdict cache), schemas without a finite value are a 400, normal ones still work."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import jsonschema
import pytest

from nitro_torch.server.chat.grammar_check import CHECK_TIME_LIMIT_S, GRAMMAR_TOO_COMPLEX
from tests.tool_fixtures import (  # noqa: F401  (fixtures)
    TOOLS,
    tool_async_engine,
    tool_engine_config,
    tool_model_dir,
    tool_server_url,
)

CHAT = "/v1/chat/completions"
HEALTH_BOUND_S = 0.5
"""Generous for this shared 2-core machine (measured: 12 ms at worst); before the fix /health waited 10-24 s."""


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def wide_schema(properties: int) -> dict:
    """Checks (and compiles) for far longer than the limit: about 20 s for 1,500 properties on one core."""
    prefix = uuid.uuid4().hex[:6]  # unseen by the verdict cache of a server shared with other tests
    return {"type": "object", "properties": {f"{prefix}{i}": {"type": "string"} for i in range(properties)}}


def chat(base_url: str, **fields) -> tuple[httpx.Response, float]:
    body = {"messages": [{"role": "user", "content": "Reply in JSON."}], "max_tokens": 8, **fields}
    started = time.perf_counter()
    response = httpx.post(base_url + CHAT, json=body, timeout=120)
    return response, time.perf_counter() - started


def chat_while_polling_health(base_url: str, **fields) -> tuple[httpx.Response, list[float]]:
    """The request, sent while another client polls /health until it is answered; the /health latencies."""
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(chat(base_url, **fields)[0]))
    latencies: list[float] = []
    with httpx.Client(timeout=60) as poller:
        sender.start()
        while sender.is_alive():
            started = time.perf_counter()
            assert poller.get(base_url + "/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    sender.join()
    return answer[0], latencies


def assert_error(response: httpx.Response, param: str, code: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error["message"]


@pytest.mark.parametrize("levels", [300, 400])
def test_a_deeply_nested_schema_string_is_a_400_and_health_stays_fast(live_server, levels):
    spec = json.dumps(nested_schema(levels))  # a string: the body's own depth cap does not look inside it
    response, latencies = chat_while_polling_health(live_server.base_url, guided_json=spec)
    message = assert_error(response, "guided_json", GRAMMAR_TOO_COMPLEX)
    assert "128 levels" in message
    assert max(latencies, default=0.0) < HEALTH_BOUND_S, latencies
    again, _ = chat(live_server.base_url, guided_json=spec)
    assert_error(again, "guided_json", GRAMMAR_TOO_COMPLEX)


def test_a_schema_that_takes_too_long_is_a_400_and_its_repeat_is_fast(live_server):
    schema = wide_schema(1500)
    response_format = {"type": "json_schema", "json_schema": {"name": "wide", "schema": schema}}
    response, latencies = chat_while_polling_health(live_server.base_url, response_format=response_format)
    assert_error(response, "response_format", GRAMMAR_TOO_COMPLEX)
    assert len(latencies) > 10 and max(latencies) < HEALTH_BOUND_S, latencies
    # The check is still running in its worker; the repeat is answered from the remembered verdict.
    again, elapsed = chat(live_server.base_url, response_format=response_format)
    assert_error(again, "response_format", GRAMMAR_TOO_COMPLEX)
    assert elapsed < CHECK_TIME_LIMIT_S / 2


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
])
def test_a_self_recursive_schema_without_a_finite_value_is_a_400(live_server, schema):
    response, _ = chat(live_server.base_url, guided_json=json.dumps(schema))
    message = assert_error(response, "guided_json", "invalid_value")
    assert "no finite output" in message


def test_a_recursive_schema_with_finite_values_is_accepted(live_server):
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
            "required": ["name"], "additionalProperties": False}
    response, _ = chat(live_server.base_url, guided_json=tree, max_tokens=200, temperature=0)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # the small model may nest until max_tokens cuts it
        jsonschema.validate(json.loads(choice["message"]["content"]), tree)
    else:
        assert choice["message"]["content"].startswith('{"name": ')


def test_a_normal_guided_json_still_works(live_server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    for _ in range(2):  # the second is answered from the verdict cache
        response, _ = chat(live_server.base_url, guided_json=json.dumps(schema), max_tokens=60, temperature=0)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_a_forced_tool_whose_schema_has_no_finite_value_is_a_400_on_tools(tool_server_url):  # noqa: F811
    base_url = tool_server_url.removesuffix("/v1")
    loop = {"type": "function", "function": {"name": "loop", "parameters": {
        "type": "object", "properties": {"again": {"$ref": "#"}}, "required": ["again"]}}}
    response, _ = chat(base_url, tools=[*TOOLS, loop], tool_choice="required")
    message = assert_error(response, "tools", "invalid_value")
    assert "'loop'" in message and "no finite output" in message
