"""Tools / tool_choice: the call parsers (whole and streamed), request validation, template rendering, and forced
calls through the real engine on a tiny random-weight model whose template supports tools."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.chat.protocol import ChatMessage
from nitro_torch.server.chat.template import to_template_messages
from nitro_torch.server.chat.tool_parsers import HERMES, LLAMA3_JSON, MISTRAL, resolve_format
from nitro_torch.server.chat.tools import (
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    ToolChoice,
    ToolDefinition,
    ToolFields,
    parse_tool_calls,
    template_messages_for_tools,
    template_renders_tools,
    template_tools,
    tool_choice_guidance,
    validate_tool_choice,
)
from tests.tool_fixtures import PARAMETERS_BY_NAME, TOOLS, tool_model_dir  # noqa: F401  (fixture)
from tests.tool_templates import (
    HERMES_TOOL_TEMPLATE,
    LLAMA3_TOOL_TEMPLATE_SNIPPET,
    MISTRAL_TOOL_TEMPLATE_SNIPPET,
)

WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
DEFINITIONS = [ToolDefinition.model_validate(tool) for tool in TOOLS]


def stream(fmt, text: str, size: int) -> tuple[list[str], list[ToolCallDelta], ToolCallStreamParser]:
    """Feeds `text` in pieces of `size` characters; returns the content deltas, the call deltas and the parser."""
    parser = ToolCallStreamParser(fmt)
    contents, deltas = [], []
    for start in range(0, len(text), size):
        content, calls = parser.feed(text[start:start + size])
        contents.append(content)
        deltas.extend(calls)
    content, calls = parser.finish()
    contents.append(content)
    deltas.extend(calls)
    return contents, deltas, parser


def reassemble(deltas: list[ToolCallDelta]) -> list[dict]:
    """What an OpenAI client builds from the streamed deltas."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        piece = delta.to_openai()
        call = calls.setdefault(piece["index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = piece.get("id", call["id"])
        call["name"] = piece["function"].get("name", call["name"])
        call["arguments"] += piece["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


# ---- parsing ---------------------------------------------------------------------------------------------


def test_a_reply_that_is_one_call_has_no_content():
    content, calls = parse_tool_calls("hermes", WEATHER_CALL)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert calls[0].id.startswith("call_")


def test_text_before_a_call_is_the_content():
    content, calls = parse_tool_calls("hermes", "Let me check.\n" + WEATHER_CALL + "\n")
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather"]


def test_several_calls_keep_their_order_and_ids_differ():
    content, calls = parse_tool_calls("hermes", WEATHER_CALL + "\n" + TIME_CALL)
    assert content is None
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 1000])
def test_markers_split_across_deltas_never_leak_into_content(size):
    text = "Let me check.\n" + WEATHER_CALL + "\n" + TIME_CALL + "\n"
    contents, deltas, parser = stream("hermes", text, size)
    assert "".join(contents) == "Let me check."
    assert not any("<" in piece for piece in contents)
    assert reassemble(deltas) == [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parser.tool_calls]
    assert [c["name"] for c in reassemble(deltas)] == ["get_weather", "get_time"]
    _, whole = parse_tool_calls("hermes", text)
    assert [(c.name, c.arguments) for c in parser.tool_calls] == [(c.name, c.arguments) for c in whole]


def test_streamed_deltas_have_openais_shape():
    _, deltas, parser = stream("hermes", WEATHER_CALL, 4)
    call = parser.tool_calls[0]
    assert [d.to_openai() for d in deltas] == [
        {"index": 0, "id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}},
    ]
    assert ToolCallDelta(0, arguments='{"a"').to_openai() == {"index": 0, "function": {"arguments": '{"a"'}}
    assert call.to_openai() == {"id": call.id, "type": "function",
                                "function": {"name": "get_weather", "arguments": call.arguments}}
    assert parser.has_tool_calls


def test_content_streams_as_it_comes_when_it_cannot_be_a_marker():
    parser = ToolCallStreamParser("hermes")
    assert parser.feed("Hello wor") == ("Hello wor", [])
    assert parser.feed("ld <tool") == ("ld", [])
    assert parser.feed("box> ") == (" <toolbox>", [])
    assert parser.finish() == (" ", [])
    assert not parser.has_tool_calls


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',  # broken JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # cut off inside the call
    "plain text, trailing space and a lone < ",
    "ends with half a marker <tool_ca",
])
def test_text_that_is_not_a_valid_call_stays_content_unchanged(text):
    assert parse_tool_calls("hermes", text) == (text, [])
    for size in (1, 4, 1000):
        contents, deltas, parser = stream("hermes", text, size)
        assert "".join(contents) == text and deltas == [] and not parser.has_tool_calls


def test_a_broken_call_stays_content_next_to_a_valid_one():
    broken = "<tool_call>\n{not json}\n</tool_call>"
    content, calls = parse_tool_calls("hermes", broken + "\n" + WEATHER_CALL)
    assert content == broken
    assert [c.name for c in calls] == ["get_weather"]


def test_arguments_written_as_a_json_string_are_normalised():
    text = '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
    _, calls = parse_tool_calls("hermes", text)
    assert json.loads(calls[0].arguments) == {"zone": "CET"}


def test_llama3_json_calls():
    text = '{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "parameters": {}}'
    content, calls = parse_tool_calls("llama3_json", text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"}), ("get_weather", {})]
    assert parse_tool_calls("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}')[1][0].name == "f"
    assert parse_tool_calls("llama3_json", '{"answer": 42}') == ('{"answer": 42}', [])
    parser = ToolCallStreamParser("llama3_json")
    assert parser.feed("The answer") == ("The answer", [])  # not JSON: streams at once


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]',
    '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}',
    '[{"name": "get_time", "arguments": {"zone": "UTC"}}]',  # its special token dropped by skip_special_tokens
])
def test_mistral_calls(text):
    content, calls = parse_tool_calls("mistral", text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]


# ---- formats and template support ------------------------------------------------------------------------


@pytest.fixture
def template_tokenizer(smol_tokenizer, monkeypatch):
    """SmolLM2's tokenizer with a chosen chat template (restored after the test)."""

    def use(template):
        monkeypatch.setattr(smol_tokenizer, "chat_template", template)
        return smol_tokenizer

    return use


def test_the_format_is_read_from_the_template(template_tokenizer):
    assert resolve_format(template_tokenizer(HERMES_TOOL_TEMPLATE)) is HERMES
    assert resolve_format(template_tokenizer(LLAMA3_TOOL_TEMPLATE_SNIPPET)) is LLAMA3_JSON
    assert resolve_format(template_tokenizer(MISTRAL_TOOL_TEMPLATE_SNIPPET)) is MISTRAL
    tokenizer = template_tokenizer(HERMES_TOOL_TEMPLATE)
    assert parse_tool_calls(tokenizer, WEATHER_CALL)[1][0].name == "get_weather"


def test_a_template_without_tools_is_told_apart(smol_tokenizer):
    # SmolLM2-135M-Instruct's own template ignores tools: they get the built-in prompt (test_tool_prompt.py).
    assert not template_renders_tools(smol_tokenizer)


def test_templates_that_render_tools_are_recognised(template_tokenizer):
    assert template_renders_tools(template_tokenizer(HERMES_TOOL_TEMPLATE))
    assert template_renders_tools(template_tokenizer({"default": "{{ messages[0].content }}",
                                                      "tool_use": HERMES_TOOL_TEMPLATE}))


# ---- request validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", [
    {"type": "function", "function": {"name": "has space"}},
    {"type": "function", "function": {"name": "x" * 65}},
    {"type": "retrieval", "function": {"name": "f"}},
    {"type": "function"},
])
def test_malformed_tools_are_refused(tool):
    with pytest.raises(ValidationError):
        ToolFields.model_validate({"tools": [tool]})


def test_tool_choice_defaults_follow_openai():
    assert validate_tool_choice(None, DEFINITIONS) == ToolChoice("auto")
    assert validate_tool_choice(None, None) == ToolChoice("none")
    assert validate_tool_choice("required", DEFINITIONS) == ToolChoice("required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert validate_tool_choice(named, DEFINITIONS) == ToolChoice("function", "get_time")
    assert ToolFields.model_validate({"tools": TOOLS, "tool_choice": named}).resolved_tool_choice().name == "get_time"


@pytest.mark.parametrize("choice, tools", [
    ({"type": "function", "function": {"name": "get_stock_price"}}, TOOLS),  # not among the tools
    ({"type": "function", "function": {"name": "get_time"}}, None),
    ({"type": "function"}, TOOLS),
    ("always", TOOLS),
    ("required", None),
])
def test_bad_tool_choices_are_400s_on_tool_choice(choice, tools):
    with pytest.raises(SamplingParamsError) as info:
        ToolFields.model_validate({"tools": tools, "tool_choice": choice}).resolved_tool_choice()
    assert info.value.param == "tool_choice"


def test_a_function_defined_twice_is_refused():
    with pytest.raises(SamplingParamsError) as info:
        ToolFields.model_validate({"tools": [TOOLS[0], TOOLS[0]]}).resolved_tool_choice()
    assert info.value.param == "tools"


# ---- rendering -------------------------------------------------------------------------------------------


def test_tools_are_rendered_unless_the_choice_is_none():
    assert template_tools(DEFINITIONS, ToolChoice("none")) is None
    assert template_tools(None, ToolChoice("auto")) is None
    no_parameters = ToolDefinition.model_validate({"type": "function", "function": {"name": "ping"}})
    rendered = template_tools(DEFINITIONS + [no_parameters], ToolChoice("auto"))
    assert rendered[0] == {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.", "parameters": PARAMETERS_BY_NAME["get_weather"]}}
    assert rendered[2] == {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


def test_the_tools_appear_in_the_prompt(template_tokenizer):
    tokenizer = template_tokenizer(HERMES_TOOL_TEMPLATE)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Lima?"}],
                                           tools=template_tools(DEFINITIONS, ToolChoice("auto")),
                                           add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in prompt and '"enum": ["UTC", "CET"]' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_history_with_calls_and_results_renders(template_tokenizer):
    raw = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"},
    ]
    messages = template_messages_for_tools(to_template_messages([ChatMessage.model_validate(m) for m in raw]))
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert messages[2]["name"] == "get_weather"
    tokenizer = template_tokenizer(HERMES_TOOL_TEMPLATE)
    prompt = tokenizer.apply_chat_template(messages, tools=template_tools(DEFINITIONS, ToolChoice("auto")),
                                           add_generation_prompt=True, tokenize=False)
    assert WEATHER_CALL + "<|im_end|>" in prompt  # the object, not a JSON string inside JSON
    assert "<tool_response>\n22 degrees\n</tool_response>" in prompt


def test_a_call_without_a_function_name_in_the_history_is_a_400():
    with pytest.raises(SamplingParamsError) as info:
        template_messages_for_tools([{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}])
    assert info.value.param == "messages"


# ---- forcing a call --------------------------------------------------------------------------------------


def test_nothing_is_forced_for_auto_and_none():
    assert tool_choice_guidance("hermes", DEFINITIONS, ToolChoice("auto"), True) is None
    assert tool_choice_guidance("hermes", DEFINITIONS, ToolChoice("none"), True) is None


@pytest.mark.parametrize("fmt, call", [
    ("hermes", WEATHER_CALL),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'),
])
def test_the_forcing_grammar_accepts_exactly_valid_calls(fmt, call):
    from xgrammar.testing import _is_grammar_accept_string

    from nitro_torch.runner.guided import grammar_of

    named = tool_choice_guidance(fmt, DEFINITIONS, ToolChoice("function", "get_weather"), True)
    assert named is not None and named.kind == "structural_tag"
    grammar = grammar_of(named)
    assert _is_grammar_accept_string(grammar, call)
    assert parse_tool_calls(fmt, call)[1][0].name == "get_weather"
    assert not _is_grammar_accept_string(grammar, call.replace("Paris", "Rome"))  # outside the schema's enum
    assert not _is_grammar_accept_string(grammar, "")  # a call is required
    assert not _is_grammar_accept_string(grammar, "Sure! " + call)


def test_required_allows_any_tool_and_several_calls_only_when_parallel():
    from xgrammar.testing import _is_grammar_accept_string

    from nitro_torch.runner.guided import grammar_of

    two = WEATHER_CALL + "\n" + TIME_CALL
    parallel = grammar_of(tool_choice_guidance("hermes", DEFINITIONS, ToolChoice("required"), True))
    single = grammar_of(tool_choice_guidance("hermes", DEFINITIONS, ToolChoice("required"), False))
    assert _is_grammar_accept_string(parallel, TIME_CALL) and _is_grammar_accept_string(parallel, two)
    assert _is_grammar_accept_string(single, TIME_CALL) and not _is_grammar_accept_string(single, two)


@pytest.fixture(scope="module")
def tool_engine(tool_model_dir):  # noqa: F811  (pytest fixture injection)
    from nitro_torch.config import build_config
    from nitro_torch.engine.engine import LLMEngine

    return LLMEngine.from_config(build_config({"model": tool_model_dir, "device": "cpu"}, env={}))


def forced_reply(engine, choice: ToolChoice, parallel: bool, **params) -> tuple[str | None, list[ToolCall], str]:
    tokenizer = engine.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the weather in Tokyo?"}],
                                           tools=template_tools(DEFINITIONS, choice), add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    guided = tool_choice_guidance(tokenizer, DEFINITIONS, choice, parallel)
    [ids] = engine.generate([list(prompt)], SamplingParams(max_tokens=200, guided=guided, **params))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    content, calls = parse_tool_calls(tokenizer, text)
    return content, calls, text


def assert_valid(calls: list[ToolCall]) -> None:
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), PARAMETERS_BY_NAME[call.name])


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7}])
def test_a_named_choice_makes_even_a_random_model_call_that_function(tool_engine, params):
    content, calls, text = forced_reply(tool_engine, ToolChoice("function", "get_weather"), True, **params)
    assert content is None, text
    assert [c.name for c in calls] == ["get_weather"]
    assert_valid(calls)


def test_required_makes_a_random_model_call_a_tool(tool_engine):
    content, calls, text = forced_reply(tool_engine, ToolChoice("required"), False, temperature=1.0, seed=3)
    assert content is None, text
    assert len(calls) == 1 and calls[0].name in PARAMETERS_BY_NAME
    assert_valid(calls)


def test_a_schema_that_cannot_be_enforced_is_a_400_on_tools():
    bad = ToolDefinition.model_validate({"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string", "pattern": "(("}}}}})
    with pytest.raises(SamplingParamsError) as info:
        tool_choice_guidance("hermes", [*DEFINITIONS, bad], ToolChoice("required"), True)
    assert info.value.param == "tools" and "'lookup'" in str(info.value)
