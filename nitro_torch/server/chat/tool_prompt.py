"""Tools for models whose chat template cannot render them (and for Nitro's prompt prefixes, which have no template):
a built-in tool prompt in the style of the Hermes and Qwen2.5 templates, and the conversation's calls and results
written as text that any template renders.

The tools go into the system turn as JSON lines inside <tools></tools>, with the instruction to answer with
<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>; earlier assistant `tool_calls` become that text in
the assistant's content, and `tool` results become a user turn of <tool_response> blocks, as Qwen2.5 renders them.
The output is then read in the HERMES format, and a forced tool_choice uses HERMES' grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nitro_torch.server.chat.tool_parsers import HERMES, ToolFormat, resolve_format
from nitro_torch.server.chat.tools import template_renders_tools

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nitro_torch.server.chat.template import ChatFormatter

TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
SECTION_SEPARATOR = "\n\n"
_PROBE_SYSTEM = "\ue010system probe\ue011"
_system_turn_cache: dict[str, bool] = {}


@dataclass(frozen=True)
class ToolRendering:
    """What the chat template gets for a conversation with tools, and how the model's calls are then read."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    """The template's `tools=`: None when the tools are in the messages already (or none were offered)."""
    format: ToolFormat
    built_in: bool
    """The built-in tool prompt was used (the template cannot render tools)."""


def uses_tool_prompt(formatter: ChatFormatter) -> bool:
    """Whether the conversation's tools need the built-in prompt: prompt prefixes, or a template without tools."""
    return formatter.prefixes is not None or not template_renders_tools(formatter.tokenizer)


def render_tools(formatter: ChatFormatter, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None) -> ToolRendering:
    """`messages` (already through tools.template_messages_for_tools) and `tools` (tools.template_tools: None for
    tool_choice 'none') as this model's template takes them. The conversation is converted whenever the template
    cannot render tools, offered or not: a history with calls and results needs it either way."""
    if not uses_tool_prompt(formatter):
        return ToolRendering(messages, tools, resolve_format(formatter.tokenizer), built_in=False)
    # Only a tools section needs to know where it may go: no template probe for a plain chat.
    system_turn = bool(tools) and (formatter.prefixes is not None or renders_system_turn(formatter.tokenizer))
    return ToolRendering(with_tool_prompt(messages, tools, system_turn=system_turn), None, HERMES, built_in=True)


def with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                     system_turn: bool = True) -> list[dict[str, Any]]:
    """The conversation with the tools section in its system turn (or, where the template refuses a system role,
    at the start of the first user turn), calls and results as text. Unchanged without tools, calls or results."""
    converted = history_as_text(messages)
    if not tools:
        return converted
    section = tools_section(tools)
    if converted and converted[0]["role"] == "system":
        first = converted[0]
        return [{**first, "content": _joined(first["content"], section)}, *converted[1:]]
    if system_turn or not converted:
        return [{"role": "system", "content": section}, *converted]
    index = next((i for i, m in enumerate(converted) if m["role"] == "user"), 0)
    target = converted[index]
    return [*converted[:index], {**target, "content": _joined(section, target["content"])}, *converted[index + 1:]]


def tools_section(tools: list[dict[str, Any]]) -> str:
    """The tool prompt: one JSON line per tool, in the OpenAI shape {"type": "function", "function": {...}}."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def call_text(call: dict[str, Any]) -> str:
    """One earlier call as the model writes it; arguments that are not a JSON object are written as sent."""
    function = call["function"]
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        body = f'{{"name": {json.dumps(function["name"], ensure_ascii=False)}, "arguments": {arguments}}}'
    else:
        body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def tool_response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def history_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant `tool_calls` as text in the assistant's content; `tool` results as a user turn of
    <tool_response> blocks. Results join an adjacent user turn, so that roles still alternate."""
    converted: list[dict[str, Any]] = []
    from_results = False
    """The last converted message is a user turn that holds tool results."""
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [message["content"]] if message.get("content") else []
            parts += [call_text(call) for call in message["tool_calls"]]
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            converted.append({**rest, "content": "\n".join(parts)})
            from_results = False
        elif role == "tool":
            text = tool_response_text(message.get("content") or "")
            if converted and converted[-1]["role"] == "user":
                before = converted[-1]["content"]
                joined = before + "\n" + text if from_results else _joined(before, text)
                converted[-1] = {**converted[-1], "content": joined}
            else:
                converted.append({"role": "user", "content": text})
            from_results = True
        elif role == "user" and from_results:
            converted[-1] = {**converted[-1], "content": _joined(converted[-1]["content"], message["content"])}
            from_results = False
        else:
            converted.append(message)
            from_results = False
    return converted


def _joined(first: str, second: str) -> str:
    return first + SECTION_SEPARATOR + second if first and second else first or second


def renders_system_turn(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template accepts a system message and shows it (Gemma 2's, for one, raises on it)."""
    key = repr(getattr(tokenizer, "chat_template", None))
    if key not in _system_turn_cache:
        probe = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _system_turn_cache[key] = isinstance(text, str) and _PROBE_SYSTEM in text
        except Exception:  # a template refuses with TemplateError or any error its own code raises
            _system_turn_cache[key] = False
    return _system_turn_cache[key]
