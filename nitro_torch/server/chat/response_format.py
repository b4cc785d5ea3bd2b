"""OpenAI's `response_format` and vLLM's structured-output extras -> one GuidedDecoding (or None).

Supported: `response_format` {"type": "text" | "json_object" | "json_schema" | "structural_tag"}, vLLM's
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and `structured_outputs` {json, regex,
choice, grammar, json_object, structural_tag}. At most one of them may constrain a request. Only the shape
is checked here, on the event loop; the grammar itself (xgrammar can take seconds) is checked off the loop,
with limits, by grammar_check.py, before any streaming starts; the engine then compiles it again.
"""

from __future__ import annotations

import json
from typing import Any

from nitro_torch.sampling import GuidedDecoding, SamplingParamsError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "structural_tag")


def guided_decoding(**fields: Any) -> GuidedDecoding | None:
    """The one structured-output constraint of a request (fields as `constraint` takes them), or None."""
    found = constraint(**fields)
    return found[1] if found is not None else None


def constraint(
    response_format: Any = None,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_choice: Any = None,
    guided_grammar: Any = None,
    structured_outputs: Any = None,
) -> tuple[str, GuidedDecoding] | None:
    """(the field, its constraint) of a request's one structured-output constraint, or None; SamplingParamsError
    (param = the field) when a field is invalid or two constrain the output."""
    found: list[tuple[str, GuidedDecoding]] = []
    if response_format is not None:
        guided = from_response_format(response_format)
        if guided is not None:
            found.append(("response_format", guided))
    for param, value, build in (
        ("guided_json", guided_json, _json_schema),
        ("guided_regex", guided_regex, _regex),
        ("guided_choice", guided_choice, _choice),
        ("guided_grammar", guided_grammar, _grammar),
    ):
        if value is not None:
            found.append((param, build(value, param)))
    if structured_outputs is not None:
        found.extend(_structured_outputs(structured_outputs))
    if not found:
        return None
    if len(found) > 1:
        raise SamplingParamsError(
            found[1][0], f"'{found[0][0]}' and '{found[1][0]}' both constrain the output; give only one")
    return found[0]


def from_response_format(value: Any) -> GuidedDecoding | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise SamplingParamsError(param, "'response_format' must be an object with a 'type'")
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise SamplingParamsError(f"{param}.type", f"'{param}.type' must be one of {', '.join(RESPONSE_FORMAT_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding("json_object")
    if kind == "structural_tag":
        # vLLM's shapes: {"type": "structural_tag", "format": {...}} (xgrammar's) or {"structures", "triggers"}.
        if "format" not in value and "structures" not in value:
            raise SamplingParamsError(param, "a 'structural_tag' response_format needs 'format' or 'structures'")
        return GuidedDecoding("structural_tag", json.dumps(value))
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise SamplingParamsError(f"{param}.json_schema",
                                  "'response_format.json_schema' must be an object with a 'schema'")
    if "name" in spec and not isinstance(spec["name"], str):
        raise SamplingParamsError(f"{param}.json_schema.name", "'response_format.json_schema.name' must be a string")
    if spec.get("schema") is None:
        return GuidedDecoding("json_object")  # a named format without a schema: any JSON object
    return _json_schema(spec["schema"], f"{param}.json_schema.schema")


def _json_schema(value: Any, param: str) -> GuidedDecoding:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SamplingParamsError(param, f"'{param}' is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise SamplingParamsError(param, f"'{param}' nests too deeply") from None
    if not isinstance(value, dict | bool):
        raise SamplingParamsError(param, f"'{param}' must be a JSON schema object")
    return GuidedDecoding("json_schema", json.dumps(value))


def _regex(value: Any, param: str) -> GuidedDecoding:
    if not isinstance(value, str) or not value:
        raise SamplingParamsError(param, f"'{param}' must be a non-empty regular expression string")
    return GuidedDecoding("regex", value)


def _choice(value: Any, param: str) -> GuidedDecoding:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise SamplingParamsError(param, f"'{param}' must be a non-empty list of strings")
    # JSON string literals are valid xgrammar EBNF literals (same escapes), so any text is matched exactly.
    return GuidedDecoding("ebnf", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))


def _grammar(value: Any, param: str) -> GuidedDecoding:
    if not isinstance(value, str) or not value.strip():
        raise SamplingParamsError(param, f"'{param}' must be a non-empty EBNF grammar string")
    return GuidedDecoding("ebnf", value)


def _structural_tag(value: Any, param: str) -> GuidedDecoding:
    text = value if isinstance(value, str) else json.dumps(value)
    if not isinstance(value, str | dict):
        raise SamplingParamsError(param, f"'{param}' must be a structural tag object or its JSON text")
    return GuidedDecoding("structural_tag", text)


def _structured_outputs(value: Any) -> list[tuple[str, GuidedDecoding]]:
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object, structural_tag."""
    if not isinstance(value, dict):
        raise SamplingParamsError("structured_outputs", "'structured_outputs' must be an object")
    builders = {"json": _json_schema, "regex": _regex, "choice": _choice, "grammar": _grammar,
                "structural_tag": _structural_tag}
    found = []
    for key, build in builders.items():
        if value.get(key) is not None:
            found.append((f"structured_outputs.{key}", build(value[key], f"structured_outputs.{key}")))
    if value.get("json_object"):
        found.append(("structured_outputs.json_object", GuidedDecoding("json_object")))
    return found
