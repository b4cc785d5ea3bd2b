"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, its request bodies the pydantic models'."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import schemathesis
from starlette.testclient import TestClient

from nitro_torch.config import build_config
from nitro_torch.server.app import create_app
from nitro_torch.server.http.errors import ErrorResponse
from nitro_torch.server.http.security import PUBLIC_PATHS
from nitro_torch.server.openapi import OPERATIONS, REF, build_document, document, openapi_path, served_operations

from .helpers import ENGINE_OPTIONS

KEY = "sk-openapi-test"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def spec(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def inline(schema: Any, defs: dict[str, Any], prefix: str) -> Any:
    """`schema` with every `$ref` into `defs` replaced by its target (the models are not recursive)."""
    if isinstance(schema, list):
        return [inline(item, defs, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        siblings = {key: value for key, value in schema.items() if key != "$ref"}
        return {**inline(defs[schema["$ref"].removeprefix(prefix)], defs, prefix), **inline(siblings, defs, prefix)}
    return {key: inline(value, defs, prefix) for key, value in schema.items() if key != "$defs"}


def resolved(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    return inline(schema, spec["components"]["schemas"], REF.removesuffix("{model}"))


def pydantic_schema(model: type) -> Any:
    raw = model.model_json_schema()
    return inline(raw, raw.get("$defs", {}), "#/$defs/")


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"components": spec["components"], **schema})


def test_a_valid_openapi_3_1_document(spec):
    assert spec["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(spec).validate()  # the OpenAPI 3.1 meta-schema
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_served_route_is_documented(client, spec):
    served = {(openapi_path(route.path), method.lower()) for route in client.app.routes
              for method in getattr(route, "methods", None) or () if method != "HEAD"}
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert served == documented
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/{model_id}",
                 "/tokenize", "/detokenize", "/inferences/llamacpp/chat_completion", "/inferences/llamacpp/loadmodel",
                 "/inferences/llamacpp/unloadmodel", "/inferences/llamacpp/modelstatus",
                 "/inferences/llamacpp/embedding", "/healthz", "/health", "/ready", "/metrics", "/openapi.json"):
        assert path in spec["paths"], path
    assert set(spec["paths"]) == {key.split(" ")[-1] for key in OPERATIONS}  # "METHOD path" where methods differ
    parameter = spec["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]
    assert parameter["name"] == "model_id" and parameter["in"] == "path" and parameter["required"]


def test_request_bodies_are_the_pydantic_models_schemas(spec):
    bodies = {path: operation.body for path, operation in OPERATIONS.items() if operation.body is not None}
    assert {"/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize",
            "/inferences/llamacpp/loadmodel", "/inferences/llamacpp/chat_completion"} <= set(bodies)
    for path, model in bodies.items():
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert resolved(spec, body["content"]["application/json"]["schema"]) == pydantic_schema(model), path
    without_body = [(path, method) for path, item in spec["paths"].items() for method, op in item.items()
                    if "requestBody" in op and OPERATIONS.get(f"{method.upper()} {path}", OPERATIONS.get(path)).body is None]
    assert not without_body


def test_errors_responses_and_security(spec):
    error_schema = resolved(spec, {"$ref": REF.format(model="ErrorResponse")})
    assert error_schema == pydantic_schema(ErrorResponse)
    assert set(error_schema["properties"]["error"]["properties"]) == {"message", "type", "param", "code"}
    anthropic_error = resolved(spec, {"$ref": REF.format(model="AnthropicErrorResponse")})
    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    assert spec["security"] == [{"bearer": []}, {"x-api-key": []}, {}]  # no --api-key: a key is optional
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            default = operation["responses"]["default"]["content"]["application/json"]["schema"]
            expected = anthropic_error if path.startswith("/v1/messages") else error_schema
            assert resolved(spec, default) == expected, (method, path)
            assert "200" in operation["responses"], (method, path)
            assert (operation.get("security") == []) == (path in PUBLIC_PATHS), (method, path)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    assert chat["application/json"]["schema"] == {"$ref": REF.format(model="ChatCompletionResponse")}
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_answers_match_the_published_schemas(client, spec):
    calls = [
        ("GET", "/v1/models", None), ("GET", "/healthz", None), ("GET", "/health", None), ("GET", "/ready", None),
        ("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, "logprobs": True, "top_logprobs": 1}),
        ("POST", "/inferences/llamacpp/chat_completion", {"messages": HELLO, "max_tokens": 1}),
        ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("POST", "/v1/embeddings", {"input": ["a", "b"]}),
        ("POST", "/tokenize", {"prompt": "Hi", "return_token_strs": True}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
        ("GET", "/inferences/llamacpp/modelstatus", None),
        ("POST", "/v1/messages", {"messages": HELLO, "max_tokens": 2}),
        ("POST", "/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
        ("POST", "/v1/messages/count_tokens", {"messages": HELLO}),
    ]
    for method, path, body in calls:
        response = client.request(method, path, json=body)
        assert response.status_code == 200, (path, response.text)
        schema = spec["paths"][path][method.lower()]["responses"]["200"]["content"]["application/json"]["schema"]
        validator(spec, schema).validate(response.json())
    model_id = client.get("/v1/models").json()["data"][0]["id"]
    card = client.get(f"/v1/models/{model_id}").json()
    validator(spec, spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]["200"]["content"]["application/json"]
              ["schema"]).validate(card)
    stored = client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2}).json()["id"]
    for method in ("get", "delete"):
        answer = client.request(method.upper(), f"/v1/responses/{stored}")
        assert answer.status_code == 200, answer.text
        validator(spec, spec["paths"]["/v1/responses/{response_id}"][method]["responses"]["200"]["content"]
                  ["application/json"]["schema"]).validate(answer.json())
    error = client.post("/v1/chat/completions", content=b"{")
    assert error.status_code == 400
    validator(spec, {"$ref": REF.format(model="ErrorResponse")}).validate(error.json())
    error = client.post("/v1/messages", content=b"{")
    assert error.status_code == 400
    validator(spec, {"$ref": REF.format(model="AnthropicErrorResponse")}).validate(error.json())


def test_built_once_per_app_and_under_the_key(real_engine):
    with TestClient(create_app(build_config({**ENGINE_OPTIONS, "api_key": KEY}, env={}), real_engine)) as client:
        assert client.get("/openapi.json").status_code == 401
        first = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert first.status_code == 200
        assert first.json()["security"] == [{"bearer": []}, {"x-api-key": []}]
        assert document(client.app) is document(client.app)
        assert client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).content == first.content


def test_an_undocumented_route_fails_loudly(client):
    from starlette.routing import Route

    routes = [*client.app.routes, Route("/v1/not-documented", lambda request: None)]
    assert ("/v1/not-documented", "GET") in {(path, method) for path, method, _ in served_operations(routes)}
    with pytest.raises(KeyError):
        build_document(routes, client.app.state.config)
