"""One chat completion rendered as Anthropic's message: content blocks, stop reason and usage, whole or as the
Messages API's server-sent events (message_start, content_block_start/delta/stop..., message_delta,
message_stop; each with its `event:` line, which Anthropic's clients dispatch on)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from nitro_torch.engine.outputs import FinishReason
from nitro_torch.server.anthropic.errors import error_event
from nitro_torch.server.anthropic.protocol import MessageResponse, StopReason, TextBlock, ToolUseBlock, Usage
from nitro_torch.server.chat.generation import Choice, Completion, aborted_error
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.http.sse import SHUTDOWN_MESSAGE

logger = logging.getLogger("nitro_torch.server")


def sse(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


def tool_use_id(call_id: str) -> str:
    """The chat pipeline's `call_<hex>` in Anthropic's spelling."""
    return "toolu_" + call_id.removeprefix("call_")


def _arguments(text: str) -> dict[str, Any]:
    try:  # the tool parser hands over only calls whose arguments parse as an object
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class ContentBlocks:
    """The answer's content blocks, built as its text and tool calls arrive, with the events that build them."""

    def __init__(self) -> None:
        self.blocks: list[TextBlock | ToolUseBlock] = []
        self._open: Literal["text", "tool_use"] | None = None
        self._arguments = ""

    def add(self, text: str, calls: list[dict[str, Any]]) -> list[bytes]:
        """Events for newly generated text and tool-call deltas (OpenAI's shape, as Choice.split gives them)."""
        events = []
        if text:
            if self._open != "text":
                events += self._start(TextBlock(text=""))
            block = self.blocks[-1]
            assert isinstance(block, TextBlock)
            block.text += text
            events.append(self._delta({"type": "text_delta", "text": text}))
        for call in calls:
            function = call.get("function") or {}
            if call.get("id"):
                events += self._start(ToolUseBlock(id=tool_use_id(call["id"]), name=function.get("name", ""),
                                                   input={}))
            arguments = function.get("arguments") or ""
            if arguments and self._open == "tool_use":
                self._arguments += arguments
                events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def finish(self) -> list[bytes]:
        """Closes the last block; an answer with no content at all gets one empty text block."""
        events = self._stop()
        if not self.blocks:
            events += self._start(TextBlock(text="")) + self._stop()
        return events

    def _start(self, block: TextBlock | ToolUseBlock) -> list[bytes]:
        events = self._stop()
        self.blocks.append(block)
        self._open = block.type
        self._arguments = ""
        return events + [sse({"type": "content_block_start", "index": len(self.blocks) - 1,
                              "content_block": block.model_dump()})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse({"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta})

    def _stop(self) -> list[bytes]:
        if self._open is None:
            return []
        block = self.blocks[-1]
        if isinstance(block, ToolUseBlock):
            block.input = _arguments(self._arguments)
        self._open = None
        return [sse({"type": "content_block_stop", "index": len(self.blocks) - 1})]


def stop_reason(choice: Choice, stop_sequences: list[str]) -> tuple[StopReason, str | None]:
    """(stop_reason, stop_sequence): the engine reports which stop string ended the text; only the client's own
    count as a stop_sequence (the template's end-of-turn strings are a natural end)."""
    final = choice.final
    assert final is not None
    if final.finish_reason == FinishReason.LENGTH:
        return "max_tokens", None
    if choice.parser is not None and choice.parser.tool_calls:
        return "tool_use", None
    if final.stop_string is not None and final.stop_string in stop_sequences:
        return "stop_sequence", final.stop_string
    return "end_turn", None


class MessageGeneration:
    """A Completion of one choice, answered as an Anthropic message (for http/context.py's `respond`)."""

    def __init__(self, completion: Completion, stop_sequences: list[str]) -> None:
        self.completion = completion
        self.stop_sequences = stop_sequences
        self.id = "msg_" + completion.id.removeprefix("chatcmpl-")

    @property
    def choice(self) -> Choice:
        return self.completion.choices[0]

    def usage(self) -> Usage:
        cached = self.choice.num_cached_tokens
        return Usage(input_tokens=len(self.completion.prompt_ids) - cached,
                     output_tokens=self.choice.num_output_tokens, cache_read_input_tokens=cached)

    def message(self, content: list[TextBlock | ToolUseBlock], reason: StopReason | None,
                sequence: str | None) -> MessageResponse:
        return MessageResponse(id=self.id, model=self.completion.engine.model_name, content=content,
                               stop_reason=reason, stop_sequence=sequence, usage=self.usage())

    def shutdown_events(self) -> bytes:
        """What ends a stream cut by the shutdown deadline (http/sse.py): Anthropic's error event."""
        return error_event(APIError(503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutdown"))

    async def collect(self) -> MessageResponse:
        blocks = ContentBlocks()
        async with aclosing(self.completion.outputs()) as outputs:
            async for choice, output in outputs:
                if output.finish_reason == FinishReason.ABORT:
                    raise aborted_error()
                blocks.add(*choice.split(output.new_text, last=output.finished))
        blocks.finish()
        return self.message(blocks.blocks, *stop_reason(self.choice, self.stop_sequences))

    async def stream(self) -> AsyncIterator[bytes]:
        blocks = ContentBlocks()
        started = False
        try:
            async with aclosing(self.completion.outputs()) as outputs:
                async for choice, output in outputs:
                    if not started:  # after prefill: the usage knows the cached prompt tokens
                        started = True
                        yield sse({"type": "message_start", "message": self.message([], None, None).model_dump()})
                    if output.finish_reason == FinishReason.ABORT:
                        yield error_event(aborted_error())
                        return
                    for event in blocks.add(*choice.split(output.new_text, last=output.finished)):
                        yield event
            for event in blocks.finish():
                yield event
            reason, sequence = stop_reason(self.choice, self.stop_sequences)
            yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                       "usage": self.usage().model_dump()})
            yield sse({"type": "message_stop"})
        except Exception as exc:  # headers are sent: the error can only travel as an event
            logger.error("error while streaming %s", self.id, exc_info=exc)
            yield error_event(APIError(500, "The server had an error while processing your request.",
                                       type="server_error", code="internal_error"))
