"""An Anthropic Messages request -> the ChatCompletionRequest that chat/preprocess.py runs, so both APIs share one
path to the engine (template, tools, structured output, checks).

Each block is checked here, and a bad one is a 400 that names it by its place in the Anthropic request
(`messages.2.content.1: ...`): the chat pipeline would name the translated message instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from nitro_torch.server.anthropic.protocol import CountTokensRequest, MessageParam, MessagesRequest, ToolChoiceParam
from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.chat.tools import FUNCTION_NAME_PATTERN
from nitro_torch.server.http.errors import APIError, validation_error

_MEDIA_BLOCKS = {"image": "images", "document": "documents", "search_result": "search results",
                 "container_upload": "container files"}
_REASONING_BLOCKS = ("thinking", "redacted_thinking")
"""A Claude turn's reasoning, sent back with the conversation: left out, as this model never thinks."""
_THINKING_OFF = ("disabled", "adaptive")
"""`adaptive` leaves thinking to the model, and this one never thinks."""
TOOL_ERROR_PREFIX = "Error: "
"""Put before the text of a `tool_result` with `is_error`: chat templates have no field for it."""


def invalid(where: str, message: str) -> APIError:
    return APIError(400, f"{where}: {message}", param=where, code="invalid_value")


def to_chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request with the same prompt, tools and sampling; APIError (400) naming the offending block."""
    _check_unsupported(body)
    messages = _system(body.system) + _messages(body.messages)
    if not any(message["role"] != "system" for message in messages):
        raise invalid("messages", "the messages hold no content; send at least one text or tool_result block.")
    prefill = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        # A final assistant turn is a prefill: the answer continues it, as Anthropic's does.
        "add_generation_prompt": not prefill,
        "continue_final_message": prefill,
        "tools": _tools(body.tools),
        "response_format": _response_format(body.output_config),
    }
    if body.tool_choice is not None:
        fields["tool_choice"] = _tool_choice(body.tool_choice)
        if body.tool_choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
                      top_p=body.top_p, top_k=body.top_k)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # not expected: every block was checked above
        raise validation_error(exc) from None


def _check_unsupported(body: CountTokensRequest) -> None:
    thinking = body.thinking
    if thinking is not None and thinking.get("type") not in _THINKING_OFF:
        raise invalid("thinking", f"thinking of type {json.dumps(thinking.get('type'))} is not available: this "
                                  "model answers without a thinking phase; leave 'thinking' out or send "
                                  '{"type": "disabled"}.')
    if body.mcp_servers:
        raise invalid("mcp_servers", "MCP servers are not available on this server; call tools through 'tools'.")
    if body.container is not None:
        raise invalid("container", "containers (code execution) are not available on this server.")


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(where, "a text block needs a string 'text'.")
    return text


def _refuse_block(kind: Any, where: str, allowed: str) -> APIError:
    if kind in _MEDIA_BLOCKS:
        return invalid(where, f"this model does not accept {_MEDIA_BLOCKS[kind]} (content block of type "
                              f"'{kind}'); send text blocks only.")
    return invalid(where, f"content blocks of type {json.dumps(kind)} are not supported here; send {allowed}.")


def _system(system: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    parts = []
    for index, block in enumerate(system):
        if block.get("type") != "text":
            raise _refuse_block(block.get("type"), f"system.{index}", "text blocks")
        parts.append({"type": "text", "text": _text(block, f"system.{index}")})
    return [{"role": "system", "content": parts}] if parts else []


def _messages(messages: list[MessageParam]) -> list[dict[str, Any]]:
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if isinstance(message.content, str):
            _append(converted, {"role": message.role, "content": [{"type": "text", "text": message.content}]})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for position, block in enumerate(message.content):
            where = f"messages.{index}.content.{position}"
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": _text(block, where)})
            elif kind == "tool_use" and message.role == "assistant":
                calls.append(_tool_call(block, where))
            elif kind == "tool_result" and message.role == "user":
                results.append(_tool_message(block, where))
            elif kind in _REASONING_BLOCKS and message.role == "assistant":
                continue
            else:
                allowed = ("'text' and 'tool_use' blocks" if message.role == "assistant"
                           else "'text' and 'tool_result' blocks")
                raise _refuse_block(kind, where, f"{allowed} in {message.role} messages")
        # Tool results answer the previous turn's calls: they come before the turn's own text.
        converted.extend(results)
        if parts or calls:
            _append(converted, {"role": message.role, "content": parts or None, "tool_calls": calls or None})
    for turn in converted:
        if turn.get("tool_calls") is None:
            turn.pop("tool_calls", None)
    return converted


def _append(converted: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Consecutive turns of one role become one turn, as Anthropic combines them."""
    last = converted[-1] if converted else None
    if last is None or last["role"] != message["role"] or last.get("tool_calls"):
        converted.append(message)
        return
    last["content"] = (last["content"] or []) + (message["content"] or [])
    last["tool_calls"] = message.get("tool_calls")


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        raise invalid(where, "a tool_use block needs a string 'id', a string 'name' and an object 'input'.")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, content = block.get("tool_use_id"), block.get("content", "")
    if not isinstance(call_id, str):
        raise invalid(where, "a tool_result block needs a string 'tool_use_id'.")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for position, part in enumerate(content):
            part_where = f"{where}.content.{position}"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _refuse_block(part.get("type") if isinstance(part, dict) else None, part_where, "text blocks")
            texts.append(_text(part, part_where))
        text = "\n".join(texts)
    else:
        raise invalid(where, "a tool_result's 'content' must be a string or a list of text blocks.")
    if block.get("is_error") is True:
        text = TOOL_ERROR_PREFIX + text
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        where = f"tools.{index}"
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise invalid(where, f"the server tool {json.dumps(kind)} is not available here; only custom tools "
                                 "(name, description, input_schema) can be given.")
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description")
        if not isinstance(name, str) or not re.match(FUNCTION_NAME_PATTERN, name):
            raise invalid(f"{where}.name", "tool names must be 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-'.")
        if not isinstance(schema, dict):
            raise invalid(f"{where}.input_schema", "a tool needs an 'input_schema' object (a JSON schema).")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{where}.description", "a tool's 'description' must be a string.")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if description is not None:
            function["description"] = description
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: ToolChoiceParam) -> str | dict[str, Any]:
    if choice.type == "tool":
        if not choice.name:
            raise invalid("tool_choice.name", "a tool_choice of type 'tool' needs the 'name' of the tool.")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def _response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    output_format = (output_config or {}).get("format")
    if output_format is None:
        return None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema" \
            or not isinstance(output_format.get("schema"), dict):
        raise invalid("output_config.format", 'the output format must be {"type": "json_schema", "schema": '
                                              "{...}}.")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output_format["schema"],
                                                   "strict": True}}
