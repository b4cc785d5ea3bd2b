"""Tool calls in model output: the call formats of the common chat templates, parsed whole or while streaming."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls."""

    name: str
    begin: tuple[str, ...]
    """Markers that open a call; the text before the first one is content."""
    end: str | None
    """Closes one call; None: the calls run to the end of the output."""
    start_chars: str = ""
    """Output that starts (after whitespace) with one of these is read as calls without a marker: Llama's bare
    JSON, and Mistral's list when skip_special_tokens dropped its [TOOL_CALLS] token."""
    arguments_key: str = "arguments"


HERMES = ToolFormat("hermes", begin=("<tool_call>",), end="</tool_call>")
"""Qwen2.5/Qwen3, Hermes, SmolLM3: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
LLAMA3_JSON = ToolFormat("llama3_json", begin=("<|python_tag|>",), end=None, start_chars="{",
                         arguments_key="parameters")
"""Llama 3.1+: {"name": ..., "parameters": {...}} as the whole message, several separated by ';'."""
MISTRAL = ToolFormat("mistral", begin=("[TOOL_CALLS]",), end=None, start_chars="[")
"""Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...} (v11+)."""
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def template_source(tokenizer: Any) -> str:
    """The template apply_chat_template(tools=...) renders: a dict of templates uses 'tool_use' first."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return template or ""


@lru_cache(maxsize=32)
def format_of_template(source: str) -> ToolFormat:
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and '"parameters"' in source):
        return LLAMA3_JSON
    # Hermes is the most common convention, also among templates that do not spell out their call format.
    return HERMES


def resolve_format(tokenizer_or_format: Any) -> ToolFormat:
    if isinstance(tokenizer_or_format, ToolFormat):
        return tokenizer_or_format
    if isinstance(tokenizer_or_format, str):
        return FORMATS[tokenizer_or_format]
    return format_of_template(template_source(tokenizer_or_format))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """A JSON object as text, as OpenAI sends it."""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call: the first one of a call has id and name, any later ones add arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _json_values(text: str) -> list[Any] | None:
    """JSON values one after another, separated by whitespace, ';' or ','; None unless all of it parses."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in ";,"):
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values.extend(value if isinstance(value, list) else [value])


def _arguments_text(arguments: Any) -> str | None:
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else None


def _call_of(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    text = _arguments_text(arguments)
    return None if text is None else (value["name"], text)


_MISTRAL_V11 = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\](.*)", re.DOTALL)


def parse_call_body(fmt: ToolFormat, body: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of every call in `body` (the text after a begin marker), or None if any is broken."""
    calls: list[tuple[str, str]] = []
    pieces = body.split("[TOOL_CALLS]") if fmt is MISTRAL else [body]
    for piece in pieces:
        if not piece.strip():
            continue
        v11 = _MISTRAL_V11.fullmatch(piece) if fmt is MISTRAL else None
        found: list[tuple[str, str] | None] | None
        if v11:
            text = _arguments_text(v11.group(2).strip())
            found = None if text is None else [(v11.group(1), text)]
        else:
            values = _json_values(piece)
            found = None if not values else [_call_of(value) for value in values]
        if not found or any(call is None for call in found):
            return None
        calls.extend(found)  # type: ignore[arg-type]
    return calls or None


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that a marker starts with (a marker split across deltas)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class ToolCallStreamParser:
    """Splits one choice's streamed text into content and tool calls.

    Content is emitted as soon as it cannot be the start of a call marker. Whitespace is held back too, so that
    whitespace around calls can be dropped; without calls the content is the text unchanged. Each call is emitted
    once it is complete and valid, as one delta with id, name and all its arguments (the form every client
    accumulates, even those that read only a chunk's first call); a call whose JSON does not parse, or that
    never closes, is given back as content, marker included.
    """

    def __init__(self, tokenizer_or_format: Any) -> None:
        self.format = resolve_format(tokenizer_or_format)
        self.tool_calls: list[ToolCall] = []
        self._pending = ""
        """Content not emitted yet: a possible partial marker and trailing whitespace."""
        self._marker: str | None = None
        """The begin marker of the call being read ("" for a marker-less one); None while reading content."""
        self._body = ""
        self._gap = ""
        """Whitespace before the call being read: dropped if it is a call, given back if not."""
        self._seen_text = False
        self._after_call = False
        self._finished = False

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._marker is None:
            self._pending += text
        else:
            self._body += text
        while self._step(content, deltas):
            pass
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._finished:
            return "", deltas
        self._finished = True
        if self._marker is not None:
            if self.format.end is None:
                self._close_call(self._body, content, deltas)
            else:  # cut off inside a call: what was written stays visible
                self._emit(self._gap + self._marker + self._body, content)
        elif not self.tool_calls:
            content.append(self._pending)
        elif self._pending.strip():
            self._emit(self._pending.rstrip(), content)
        self._pending, self._body, self._marker = "", "", None
        return "".join(content), deltas

    def _step(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Consumes what it can of the buffers; True when the state changed and there may be more to do."""
        if self._marker is not None:
            end = self.format.end
            if end is None or (stop := self._body.find(end)) < 0:
                return False
            body, rest = self._body[:stop], self._body[stop + len(end):]
            self._close_call(body, content, deltas)
            self._marker, self._body, self._pending = None, "", rest
            return True
        if self._after_call:
            self._pending = self._pending.lstrip()
        if not self._seen_text and self.format.start_chars:
            stripped = self._pending.lstrip()
            if stripped and stripped[0] in self.format.start_chars:
                self._marker, self._body, self._pending, self._gap = "", self._pending, "", ""
                self._seen_text = True
                return True
        hits = [(i, m) for m in self.format.begin if (i := self._pending.find(m)) >= 0]
        if hits:
            start, marker = min(hits)
            before = self._pending[:start]
            self._emit(before.rstrip(), content)
            self._gap = before[len(before.rstrip()):]
            self._marker, self._body, self._pending = marker, self._pending[start + len(marker):], ""
            self._seen_text = True
            return True
        held = _partial_suffix(self._pending, self.format.begin)
        ready = len(self._pending[:len(self._pending) - held].rstrip())
        self._emit(self._pending[:ready], content)
        self._pending = self._pending[ready:]
        return False

    def _emit(self, text: str, content: list[str]) -> None:
        if text:
            content.append(text)
            self._seen_text = True
            self._after_call = False

    def _close_call(self, body: str, content: list[str], deltas: list[ToolCallDelta]) -> None:
        calls = parse_call_body(self.format, body)
        if calls is None:
            self._emit(self._gap + (self._marker or "") + body + (self.format.end or ""), content)
            return
        for name, arguments in calls:
            call = ToolCall(new_call_id(), name, arguments)
            index = len(self.tool_calls)
            self.tool_calls.append(call)
            deltas.append(ToolCallDelta(index, call.id, name, arguments))
        self._after_call = True


def parse_tool_calls(tokenizer_or_format: Any, text: str) -> tuple[str | None, list[ToolCall]]:
    """Content and calls of a whole reply: the content is None when the reply is only calls; without calls it is
    `text` unchanged."""
    parser = ToolCallStreamParser(tokenizer_or_format)
    first, _ = parser.feed(text)
    rest, _ = parser.finish()
    if not parser.has_tool_calls:
        return text, []
    content = first + rest
    return (content if content.strip() else None), parser.tool_calls
