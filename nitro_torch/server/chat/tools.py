"""OpenAI tools / tool_choice for chat completions: request models, what the chat template gets, and the
grammar that forces a call when the client requires one. Output parsing lives in tool_parsers.py; the built-in
tool prompt for templates that cannot render tools lives in tool_prompt.py.

Errors are SamplingParamsError, which http/errors.py answers as a 400 naming the field: the request schemas
need nothing of the HTTP layer."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from jinja2 import Environment, meta
from jinja2.exceptions import TemplateSyntaxError
from pydantic import StrictBool, field_validator

from nitro_torch.sampling import GuidedDecoding, SamplingParamsError
from nitro_torch.server.chat.tool_parsers import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    ToolFormat,
    parse_tool_calls,
    resolve_format,
    template_source,
)
from nitro_torch.server.http.schema import LenientModel

__all__ = [
    "FunctionDefinition",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamParser",
    "ToolChoice",
    "ToolDefinition",
    "ToolFields",
    "parse_tool_calls",
    "template_messages_for_tools",
    "template_renders_tools",
    "template_tools",
    "tool_choice_guidance",
    "validate_tool_choice",
    "validate_tools",
]

FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MAX_JSON_WHITESPACE = 4
"""Whitespace characters allowed between JSON tokens of forced arguments: room for ordinary formatting, and a
bound on the runs of blanks an undertrained model can otherwise fall into."""


class FunctionDefinition(LenientModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments object; absent means no arguments."""
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _name_is_openai_style(cls, value: str) -> str:
        if not re.match(FUNCTION_NAME_PATTERN, value):
            raise ValueError("function names must be 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-'")
        return value

    @property
    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else EMPTY_PARAMETERS


class ToolDefinition(LenientModel):
    type: Literal["function"]
    function: FunctionDefinition


@dataclass(frozen=True)
class ToolChoice:
    """A validated `tool_choice`: mode 'function' forces the call of `name`."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


class ToolFields(LenientModel):
    """The tool fields of a chat-completions request, for ChatCompletionRequest to inherit."""

    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None

    def resolved_tool_choice(self) -> ToolChoice:
        validate_tools(self.tools)
        return validate_tool_choice(self.tool_choice, self.tools)


def validate_tools(tools: list[ToolDefinition] | None) -> None:
    names = [tool.function.name for tool in tools or []]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SamplingParamsError("tools", f"'tools' defines the function '{duplicates[0]}' more than once")


def validate_tool_choice(tool_choice: str | dict[str, Any] | None, tools: list[ToolDefinition] | None) -> ToolChoice:
    """OpenAI's rules: 'auto' by default when there are tools, 'none' without; forcing needs the tools."""
    names = [tool.function.name for tool in tools or []]
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")
    if not names:
        raise SamplingParamsError("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise SamplingParamsError("tool_choice", f"Invalid value for 'tool_choice': '{tool_choice}'. Supported "
                                                     "values are: 'none', 'auto', 'required' or a named function.")
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise SamplingParamsError("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}.")
    if name not in names:
        raise SamplingParamsError("tool_choice", f"'tool_choice' names the function '{name}', which is not "
                                                 "defined in 'tools'.")
    return ToolChoice("function", name)


@lru_cache(maxsize=32)
def _template_uses_tools(source: str) -> bool:
    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(source))
    except TemplateSyntaxError:
        return "tools" in source


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` (it names the variable somewhere); if not, tool_prompt.py
    writes them into the conversation instead."""
    return _template_uses_tools(template_source(tokenizer))


def template_tools(tools: list[ToolDefinition] | None, tool_choice: ToolChoice) -> list[dict[str, Any]] | None:
    """What apply_chat_template gets as `tools=`. None for tool_choice 'none': a model that is shown tools tends
    to call them in its own syntax, which would then reach the user as raw text."""
    if not tools or tool_choice.mode == "none":
        return None
    rendered = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        function["parameters"] = tool.function.parameters_schema
        rendered.append({"type": "function", "function": function})
    return rendered


def _template_arguments(arguments: Any) -> Any:
    """OpenAI sends arguments as JSON text; templates print them with `tojson`, so they want the object."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def template_messages_for_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI assistant `tool_calls` and `tool` messages in the shape HF chat templates expect."""
    names_by_id: dict[str, str] = {}
    converted = []
    for index, message in enumerate(messages):
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise SamplingParamsError("messages", f"messages[{index}].tool_calls: every call needs a "
                                                          "'function' with a 'name'.")
                function = {"name": function["name"], "arguments": _template_arguments(function.get("arguments", {}))}
                calls.append({**call, "type": call.get("type", "function"), "function": function})
                if isinstance(call.get("id"), str):
                    names_by_id[call["id"]] = function["name"]
            message["tool_calls"] = calls
        if message.get("role") == "tool" and "name" not in message and message.get("tool_call_id") in names_by_id:
            message["name"] = names_by_id[message["tool_call_id"]]
        converted.append(message)
    return converted


def _call_prefix(fmt: ToolFormat, name: str) -> tuple[str, str]:
    """The text around a call's arguments object, in the format's own spelling."""
    head = f'{{"name": {json.dumps(name)}, "{fmt.arguments_key}": '
    if fmt is HERMES:
        return "<tool_call>\n" + head, "}\n</tool_call>"
    return head, "}"


def _forcing_tag(fmt: ToolFormat, tools: list[ToolDefinition], single: bool) -> GuidedDecoding:
    tags = []
    for tool in tools:
        begin, end = _call_prefix(fmt, tool.function.name)
        tags.append({"type": "tag", "begin": begin, "end": end,
                     "content": {"type": "json_schema", "json_schema": tool.function.parameters_schema,
                                 "max_whitespace_cnt": MAX_JSON_WHITESPACE}})
    separator = {HERMES.name: "\n", LLAMA3_JSON.name: "; ", MISTRAL.name: ", "}[fmt.name]
    calls: dict[str, Any] = {"type": "tags_with_separator", "tags": tags, "separator": separator,
                             "at_least_one": True, "stop_after_first": single}
    if fmt is MISTRAL:  # its [TOOL_CALLS] marker is a special token a grammar cannot emit; the bare list parses too
        calls = {"type": "sequence", "elements": [{"type": "const_string", "value": "["}, calls,
                                                   {"type": "const_string", "value": "]"}]}
    return GuidedDecoding("structural_tag", json.dumps({"type": "structural_tag", "format": calls}))


def _check_enforceable(fmt: ToolFormat, guided: GuidedDecoding, tools: list[ToolDefinition]) -> None:
    """A schema xgrammar cannot compile is the client's 400 on `tools`, naming the function (on the caller's
    thread: the server checks through grammar_check.py instead, off its event loop)."""
    # Imported here, not at the top: protocol.py imports this module, and guided.py brings torch and xgrammar.
    from nitro_torch.runner.guided import grammar_of

    try:
        grammar_of(guided, "tools")
    except SamplingParamsError as exc:
        raise _naming_the_culprit(fmt, tools, exc, lambda one: grammar_of(one, "tools")) from None


def explain_unenforceable(format_of: Any, tools: list[ToolDefinition], tool_choice: ToolChoice,
                          error: SamplingParamsError, check: Callable[[GuidedDecoding], Any]) -> SamplingParamsError:
    """`error` (the forced calls' grammar failed `check`) reworded as a 400 on `tools` naming the function;
    `format_of`: the model's tokenizer, or the ToolFormat its prompt asks for."""
    fmt = resolve_format(format_of)
    return _naming_the_culprit(fmt, _chosen(tools, tool_choice), error, check)


def check_each_forced_tool(format_of: Any, tools: list[ToolDefinition], tool_choice: ToolChoice,
                           check: Callable[[GuidedDecoding], Any]) -> None:
    """Each function's call on its own: one whose schema admits no finite value would otherwise pass inside
    a grammar that offers other functions, and trap the model once it starts that call."""
    fmt = resolve_format(format_of)
    for tool in _chosen(tools, tool_choice):
        try:
            check(_forcing_tag(fmt, [tool], single=True))
        except SamplingParamsError as exc:
            raise _naming_the_culprit(fmt, [tool], exc, check) from None


def _naming_the_culprit(fmt: ToolFormat, tools: list[ToolDefinition], error: SamplingParamsError,
                        check: Callable[[GuidedDecoding], Any]) -> SamplingParamsError:
    for tool in tools:
        try:
            check(_forcing_tag(fmt, [tool], single=True))
        except SamplingParamsError as exc:
            error = exc
            culprit = f"of function '{tool.function.name}' "
            break
    else:
        culprit = ""
    detail = str(error).split(": ", 1)[-1]
    return SamplingParamsError("tools", f"The 'parameters' schema {culprit}cannot be enforced: {detail}")


def _chosen(tools: list[ToolDefinition], tool_choice: ToolChoice) -> list[ToolDefinition]:
    return [t for t in tools if tool_choice.mode == "required" or t.function.name == tool_choice.name]


def tool_choice_guidance(tokenizer: Any, tools: list[ToolDefinition] | None, tool_choice: ToolChoice,
                         parallel_tool_calls: bool | None = None, check: bool = True) -> GuidedDecoding | None:
    """For 'required' or a named function: an xgrammar structural tag that makes the output one call (several
    when parallel calls are allowed and any tool may be called) in the model's format, with arguments valid
    under the tool's schema. Nothing is forced for 'auto' and 'none'. `check` compiles it here (a 400 on
    `tools` naming the function); the server passes False and checks off its event loop (grammar_check.py)."""
    if not tool_choice.forced or not tools:
        return None
    fmt = resolve_format(tokenizer)
    chosen = _chosen(tools, tool_choice)
    single = tool_choice.mode == "function" or parallel_tool_calls is False
    guided = _forcing_tag(fmt, chosen, single)
    if check:
        _check_enforceable(fmt, guided, chosen)
    return guided
