"""The README's compatibility table is the code's: same fields as the request schemas, same answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.compat import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint, render_markdown
from nitro_torch.server.openai.completions import CompletionRequest
from nitro_torch.server.openai.embeddings import EmbeddingRequest
from nitro_torch.server.openai.responses_protocol import ResponsesRequest

README = Path(__file__).parents[2] / "README.md"
START, END = "<!-- compat:start -->", "<!-- compat:end -->"
SCHEMAS = [(CHAT, ChatCompletionRequest), (COMPLETIONS, CompletionRequest), (EMBEDDINGS, EmbeddingRequest),
           (RESPONSES, ResponsesRequest)]
BASE_BODIES = {
    CHAT.path: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    COMPLETIONS.path: {"prompt": "Hi", "max_tokens": 1},
    EMBEDDINGS.path: {"input": "Hi"},
    RESPONSES.path: {"input": "Hi", "max_output_tokens": 1, "store": False},
}


def test_readme_table_is_rendered_from_the_code():
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, "README lost its compatibility-table markers"
    table = text.split(START, 1)[1].split(END, 1)[0]
    assert table.strip() == render_markdown().strip(), \
        "README table is stale: regenerate it with `python -m nitro_torch.server.compat`"


@pytest.mark.parametrize(("endpoint", "schema"), SCHEMAS, ids=lambda x: getattr(x, "path", ""))
def test_every_parsed_field_is_in_the_table_and_back(endpoint: Endpoint, schema):
    parsed = set(schema.model_fields)
    listed = {f.name for f in endpoint.fields if f.status != "ignored"}
    ignored = {f.name for f in endpoint.fields if f.status == "ignored"}
    assert parsed == listed, f"schema-only: {parsed - listed}; table-only: {listed - parsed}"
    assert not parsed & ignored
    names = [f.name for f in endpoint.fields]
    assert len(names) == len(set(names))


def cases(status: str):
    return [pytest.param(endpoint.path, field, id=f"{endpoint.path}:{field.name}")
            for endpoint, _ in SCHEMAS for field in endpoint.fields if field.status == status]


@pytest.mark.parametrize(("path", "field"), cases("rejected"))
def test_rejected_fields_answer_400_naming_the_field(client, path, field):
    response = client.post(path, json={**BASE_BODIES[path], field.name: field.example})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field.name


@pytest.mark.parametrize(("path", "field"), cases("ignored"))
def test_ignored_fields_are_accepted(client, path, field):
    response = client.post(path, json={**BASE_BODIES[path], field.name: field.example})
    assert response.status_code == 200, response.text
