"""Fuzzing over the real engine: schemathesis against the published /openapi.json, and hypothesis against the
JSON request parser. No answer may be a 5xx or hang, every error is OpenAI's error body, and the server still
serves afterwards.

Bounded for CI (about a minute on two CPU cores); NITRO_FUZZ_EXAMPLES=N runs N cases per operation and per
parser strategy instead. Counts are printed at the end of the module.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from nitro_torch.config import build_config
from nitro_torch.server.app import create_app
from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.http.context import MAX_JSON_DEPTH
from nitro_torch.server.model_host import ModelHost
from nitro_torch.server.openai.completions import CompletionRequest
from nitro_torch.server.openai.embeddings import EmbeddingRequest
from nitro_torch.server.openapi import document

from .helpers import ENGINE_OPTIONS

EXAMPLES = int(os.environ.get("NITRO_FUZZ_EXAMPLES", "0"))
SCHEMA_EXAMPLES = EXAMPLES or 25
"""Per operation; the chat and completion routes generate (2 tokens at most) for the valid ones."""
PARSER_EXAMPLES = EXAMPLES or 60
"""Per parser strategy below."""
REQUEST_DEADLINE_S = 30.0
CHAT = "/inferences/llamacpp/chat_completion"
BODY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", CHAT)
GENERATING = {"/v1/chat/completions", "/v1/completions", CHAT, "/v1/responses", "/v1/messages"}
SMALL_COUNTS = {"max_tokens": 2, "max_completion_tokens": 2, "max_output_tokens": 2, "n": 2, "best_of": 2, "min_tokens": 2, "top_logprobs": 2}
"""Caps on what would make a valid request decode for long (or many sequences); larger values stay invalid."""
HELLO = [{"role": "user", "content": "Hi"}]
VALID = {"/v1/chat/completions": {"messages": HELLO, "max_tokens": 1}, "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
         "/v1/embeddings": {"input": "Hi"}, CHAT: {"messages": HELLO, "max_tokens": 1}}
SCHEMA_CASES: Counter[str] = Counter()
PARSER_CASES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_client(engine_config, real_engine) -> Iterator[TestClient]:
    # A host of our own: schemathesis runs (and ends) the app's lifespan around each test, and an app that owns
    # its host closes it at lifespan shutdown.
    host = ModelHost(engine_config)
    host.install(real_engine, engine_config, owned=False)
    with TestClient(create_app(engine_config, host=host), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def report_counts(request) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        for title, counts in (("schemathesis cases", SCHEMA_CASES), ("parser fuzz cases", PARSER_CASES)):
            if counts:
                reporter.write_line(f"\n{title}: {sum(counts.values())}")
                for key, n in sorted(counts.items()):
                    reporter.write_line(f"  {n:5d}  {key}")


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in the test thread if the block runs longer (a hung request), where signals are available."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_openai_error(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)


def assert_still_serving(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200, health.text
    reply = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
    assert reply.status_code == 200, reply.text


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def bounded(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with counts that pydantic would accept (ints, numeric strings) capped, and a max_tokens always."""
    for field, cap in SMALL_COUNTS.items():
        number = _as_number(body.get(field))
        if number is not None and not math.isnan(number) and cap < number <= 100_000:
            body[field] = cap
    if all(body.get(field) is None for field in ("max_tokens", "max_completion_tokens", "max_output_tokens")):
        body["max_tokens"] = body["max_output_tokens"] = 2  # each API ignores the other's field
    for field in ("prompt", "messages", "input"):
        if isinstance(body.get(field), list) and len(body[field]) > 4:  # many prompts: many sequences
            body[field] = body[field][:4]
    return body


# --- schemathesis against the published document ------------------------------------------------------------

SCHEMA_CONFIG = schemathesis.Config.from_dict({
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"mode": "all", "max-examples": SCHEMA_EXAMPLES, "deterministic": True, "database": "none"},
})
DOCUMENT_APP = create_app(build_config(ENGINE_OPTIONS, env={}))
"""Loads no model: it only serves the document, the same one the fuzzed app (same config) publishes."""
# Loading or unloading a model would swap the shared engine out from under the other operations.
# (A module-level schema, not schemathesis.pytest.from_fixture: that one fails on pytest 9.2, no Node._nodeid.)
schema = schemathesis.openapi.from_asgi("/openapi.json", DOCUMENT_APP, config=SCHEMA_CONFIG).exclude(
    path_regex="/(loadmodel|unloadmodel)$")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=SCHEMA_EXAMPLES)
def test_published_schema_fuzz(case, fuzz_client):
    if case.path in GENERATING and isinstance(case.body, dict):
        bounded(case.body)
    SCHEMA_CASES[f"{case.method} {case.path}"] += 1
    with deadline(REQUEST_DEADLINE_S):
        case.call_and_validate(app=fuzz_client.app, checks=[not_a_server_error, status_code_conformance,
                                                            content_type_conformance, response_schema_conformance])


def test_schema_fuzz_reached_every_operation_and_the_server_serves(fuzz_client):
    if not SCHEMA_CASES:
        pytest.skip("the schemathesis tests did not run")
    assert fuzz_client.get("/openapi.json").json() == document(DOCUMENT_APP)
    operations = {f"{result.ok().method.upper()} {result.ok().path}" for result in schema.get_all_operations()}
    assert operations == set(SCHEMA_CASES)
    assert not any("loadmodel" in operation for operation in operations)
    assert_still_serving(fuzz_client)


# --- hypothesis against the request parser --------------------------------------------------------------------

HUGE_NUMBERS = [b"1e308", b"-1e308", b"1e309", b"18446744073709551616", b"-9223372036854775809", b"1" + b"0" * 400,
                b"NaN", b"Infinity", b"-Infinity", b"4.9e-324"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                         st.sampled_from([2**64, -(2**63) - 1, 1e308, -1e308, 10**30]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
routes = st.sampled_from(BODY_ROUTES)
parser_settings = settings(max_examples=PARSER_EXAMPLES, deadline=None, database=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))


def post(client: TestClient, route: str, content: bytes, kind: str):
    PARSER_CASES[f"{kind:<14} POST {route}"] += 1
    with deadline(REQUEST_DEADLINE_S):
        response = client.post(route, content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response)
    return response


def with_field(route: str, field: str, raw_value: bytes) -> bytes:
    """The route's valid body with `field` set to the raw JSON text `raw_value` (which json.dumps may not write)."""
    body = {key: value for key, value in VALID[route].items() if key != field}
    encoded = json.dumps(body).encode()
    return encoded[:-1] + (b", " if body else b"") + json.dumps(field).encode() + b": " + raw_value + b"}"


def fields_of(route: str) -> list[str]:
    model = {"/v1/completions": CompletionRequest, "/v1/embeddings": EmbeddingRequest}.get(route, ChatCompletionRequest)
    return sorted(model.model_fields)


@parser_settings
@given(route=routes, data=st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b"{", b"}", b"[]", b"null", b"1", b'"x"', b"{'a': 1}", b'{"a":}', b"{,}", b"\xff\xfe\xfd",
                     b'{"messages": "\xc3\x28"}', b"\x00", b'{"a": 1} trailing', b"\xef\xbb\xbf{}"])))
def test_malformed_bodies_are_400(fuzz_client, route, data):
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    response = post(fuzz_client, route, data, "malformed")
    if not isinstance(parsed, dict):
        assert response.status_code == 400


@parser_settings
@given(data=st.data(), route=routes)
def test_wrong_types_and_huge_numbers_per_field(fuzz_client, data, route):
    field = data.draw(st.sampled_from(fields_of(route)), label="field")
    raw = data.draw(st.one_of(json_values.map(lambda value: json.dumps(value).encode()), st.sampled_from(HUGE_NUMBERS)),
                    label="value")
    content = with_field(route, field, raw)
    if route in GENERATING:
        content = json.dumps(bounded(json.loads(content))).encode()  # huge numbers stay huge
    post(fuzz_client, route, content, "wrong type")


@parser_settings
@given(route=routes, depth=st.integers(MAX_JSON_DEPTH + 1, 20_000), where=st.sampled_from(["body", "field", "object"]))
@example(route="/v1/chat/completions", depth=10_000, where="body")
@example(route="/v1/chat/completions", depth=10_000, where="field")
@example(route="/v1/chat/completions", depth=500, where="field")
def test_deep_nesting_is_a_clear_400(fuzz_client, route, depth, where):
    nested = {"body": b"[" * depth + b"]" * depth,
              "field": with_field(route, "chat_template_kwargs", b'{"x": ' + b"[" * depth + b"]" * depth + b"}"),
              "object": b'{"a": ' * depth + b"1" + b"}" * depth}[where]
    response = post(fuzz_client, route, nested, "deep nesting")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_nesting_at_the_limit_still_parses(fuzz_client):
    inner = b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2)  # the body and chat_template_kwargs: 2 levels
    response = post(fuzz_client, "/v1/chat/completions",
                    with_field("/v1/chat/completions", "chat_template_kwargs", b'{"x": ' + inner + b"}"), "deep nesting")
    assert response.status_code == 200, response.text


@parser_settings
@given(route=routes, text=st.one_of(
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=50),
    st.text(st.characters(categories=["Cc", "Cf", "Cs", "Co", "Zl", "Zp"]), min_size=1, max_size=50),
    st.integers(10_000, 300_000).map(lambda n: "x" * n),
    st.text(max_size=300)), raw_controls=st.booleans())
def test_control_characters_and_long_strings(fuzz_client, route, text, raw_controls):
    field = "input" if route == "/v1/embeddings" else "prompt" if route == "/v1/completions" else "messages"
    value: Any = [{"role": "user", "content": text}] if field == "messages" else text
    body = bounded({**VALID[route], field: value})
    content = json.dumps(body).encode()
    if raw_controls:  # unescaped control characters and lone surrogates: not JSON, or not UTF-8
        content = re.sub(rb"\\u00([01][0-9a-f])", lambda match: bytes([int(match[1], 16)]),
                         json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    post(fuzz_client, route, content, "strings")


@pytest.mark.parametrize("route", BODY_ROUTES)
def test_unpaired_surrogates_are_400_and_pairs_are_fine(fuzz_client, route):
    field = {"/v1/embeddings": "input", "/v1/completions": "prompt"}.get(route, "user")
    response = post(fuzz_client, route, with_field(route, field, b'"a\\ud800b"'), "surrogates")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert post(fuzz_client, route, with_field(route, field, b'"a\\ud83d\\ude00b"'), "surrogates").status_code == 200


def test_too_large_body_is_413(fuzz_client):
    limit = fuzz_client.app.state.config.server.max_request_bytes
    body = json.dumps({**VALID["/v1/embeddings"], "input": "x" * (limit + 1)}).encode()
    for route in BODY_ROUTES:
        assert post(fuzz_client, route, body, "too large").status_code == 413


DEEP_STRING = "[" * 100_000 + "]" * 100_000
DEEP_SCHEMA = '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000


@pytest.mark.parametrize("body", [
    {"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": DEEP_STRING}}]},
        {"role": "tool", "tool_call_id": "a", "content": "x"}]},
    {"messages": HELLO, "guided_json": DEEP_SCHEMA},
    {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": DEEP_SCHEMA}}},
], ids=["tool_call_arguments", "guided_json", "response_format"])
def test_deep_json_inside_strings(fuzz_client, body):
    post(fuzz_client, "/v1/chat/completions", json.dumps({**body, "max_tokens": 1}).encode(), "deep in string")


def test_deep_body_with_log_prompts(real_engine):
    config = build_config({**ENGINE_OPTIONS, "log_prompts": True}, env={})
    with TestClient(create_app(config, real_engine), raise_server_exceptions=False) as client:
        assert post(client, "/v1/chat/completions", b"[" * 10_000 + b"]" * 10_000, "log-prompts").status_code == 400


def test_parser_fuzz_left_the_server_serving(fuzz_client):
    started = time.monotonic()
    assert_still_serving(fuzz_client)
    assert time.monotonic() - started < REQUEST_DEADLINE_S
