"""Structured outputs over HTTP with the real default model: response_format (json_object, json_schema) and
vLLM's guided_* / structured_outputs extras, plain and streamed, greedy and sampled; bad specs are 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from .test_app import assert_error, sse_payloads, streamed_text

CHAT = "/v1/chat/completions"
PERSON = [{"role": "user", "content": "Invent a person. Reply in JSON with their name, age and city."}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
SAMPLINGS = [{"temperature": 0}, {"temperature": 1, "seed": 1234}]


def ask(client, **fields) -> dict:
    response = client.post(CHAT, json={"model": "", "messages": PERSON, "max_tokens": 160, **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_json_object_output_parses(client, sampling):
    choice = ask(client, response_format={"type": "json_object"}, **sampling)
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_json_schema_output_validates_through_the_openai_client(threaded_server, sampling):
    client = OpenAI(base_url=threaded_server.api_url, api_key="unused")
    reply = client.chat.completions.create(model="", messages=PERSON, max_tokens=160,
                                           response_format=JSON_SCHEMA_FORMAT, **sampling)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)


def test_streamed_json_schema_output_validates_when_joined(client):
    body = {"model": "", "messages": PERSON, "max_tokens": 160, "temperature": 1, "seed": 7, "stream": True,
            "response_format": JSON_SCHEMA_FORMAT}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200
    chunks = sse_payloads(response.text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(streamed_text(chunks)), PERSON_SCHEMA)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_guided_choice_returns_one_of_the_choices(threaded_server, sampling):
    client = OpenAI(base_url=threaded_server.api_url, api_key="unused")
    choices = ["positive", "negative", "neutral"]
    reply = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Sentiment of 'I love this phone!'?"}],
        max_tokens=10, extra_body={"guided_choice": choices}, **sampling)
    assert reply.choices[0].message.content in choices
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_guided_regex_matches(client, sampling):
    pattern = r"[A-Z][a-z]+, [0-9]{4}"
    choice = ask(client, guided_regex=pattern, **sampling)
    assert choice["finish_reason"] == "stop"
    assert re.fullmatch(pattern, choice["message"]["content"])


def test_guided_json_and_structured_outputs_and_grammar(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for fields in ({"guided_json": schema}, {"guided_json": json.dumps(schema)},
                   {"structured_outputs": {"json": schema}}):
        jsonschema.validate(json.loads(ask(client, temperature=0, **fields)["message"]["content"]), schema)
    choice = ask(client, temperature=0, structured_outputs={"choice": ["yes", "no"]})
    assert choice["message"]["content"] in {"yes", "no"}
    grammar = 'root ::= "The answer is " [0-9]+ "."'
    content = ask(client, temperature=1, seed=3, guided_grammar=grammar)["message"]["content"]
    assert re.fullmatch(r"The answer is [0-9]+\.", content)


def test_text_format_is_unconstrained(client):
    plain = ask(client, temperature=0, max_tokens=12)
    text = ask(client, temperature=0, max_tokens=12, response_format={"type": "text"})
    assert text["message"] == plain["message"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "[1, 2"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 1]}, "guided_choice"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"structured_outputs": {"regex": "(x"}}, "structured_outputs.regex"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_specs_are_400_naming_the_field(client, fields, param, stream):
    body = {"model": "", "messages": PERSON, "max_tokens": 8, "stream": stream, **fields}
    assert_error(client.post(CHAT, json=body), 400, param=param, code="invalid_value")


def test_invalid_schema_through_the_openai_client(threaded_server):
    client = OpenAI(base_url=threaded_server.api_url, api_key="unused")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}}}
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model="", messages=PERSON, max_tokens=8, response_format=bad)
    assert info.value.body["param"] == "response_format"
