"""One response in flight: the chat engine's output rendered as Responses output items, whole or as the
Responses stream events (each with `type` and `sequence_number`); both come from the same OutputBuilder."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from nitro_torch.engine.outputs import FinishReason, RequestOutput
from nitro_torch.server.chat.generation import Choice, Completion, aborted_error
from nitro_torch.server.http.sse import SHUTDOWN_MESSAGE
from nitro_torch.server.openai.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputText,
    ResponseObject,
    ResponseUsage,
)

logger = logging.getLogger("nitro_torch.server")

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class OutputBuilder:
    """Output items as the text arrives: a message item for content, a function_call item per tool call.
    Each call returns the events of what it added, without sequence numbers."""

    logprobs_of: Callable[[list[Any]], list[dict[str, Any]]]
    items: list[MessageItem | FunctionCallItem] = field(default_factory=list)
    open_item: MessageItem | FunctionCallItem | None = None
    pending_logprobs: list[Any] = field(default_factory=list)

    def feed(self, choice: Choice, output: RequestOutput) -> list[Event]:
        self.pending_logprobs.extend(output.logprobs or [])
        content, calls = choice.split(output.new_text, last=output.finished)
        events = self._text(content) if content else []
        for call in calls:
            events += self._call(call)
        return events

    def finish(self, incomplete: bool) -> list[Event]:
        """Closes the open item; an answer of no text and no calls is still one (empty) message."""
        events = [] if self.items else self._open_message()
        return events + self._close(incomplete)

    def _index(self, item: MessageItem | FunctionCallItem) -> int:
        return self.items.index(item)

    def _open_message(self) -> list[Event]:
        message = MessageItem(id=new_id("msg"), status="in_progress", content=[])
        self.items.append(message)
        self.open_item = message
        index = self._index(message)
        added = {"type": "response.output_item.added", "output_index": index, "item": message.model_dump()}
        part = OutputText(text="")
        message.content.append(part)  # after `added` is rendered: clients append the part of the next event
        return [added, {"type": "response.content_part.added", "item_id": message.id, "output_index": index,
                        "content_index": 0, "part": part.model_dump()}]

    def _text(self, text: str) -> list[Event]:
        events = [] if isinstance(self.open_item, MessageItem) else self._close() + self._open_message()
        message = self.open_item
        assert isinstance(message, MessageItem)
        logprobs = self.logprobs_of(self.pending_logprobs)
        self.pending_logprobs = []
        part = message.content[0]
        part.text += text
        part.logprobs += logprobs
        events.append({"type": "response.output_text.delta", "item_id": message.id,
                       "output_index": self._index(message), "content_index": 0, "delta": text,
                       "logprobs": logprobs})
        return events

    def _call(self, call: dict[str, Any]) -> list[Event]:
        """A chat tool-call delta: one with an id starts a call; one without adds to the open call's arguments."""
        self.pending_logprobs = []  # the tokens of a call are not output text
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        events: list[Event] = []
        if call.get("id") is not None or not isinstance(self.open_item, FunctionCallItem):
            events += self._close()
            item = FunctionCallItem(id=new_id("fc"), status="in_progress", call_id=call.get("id") or new_id("call"),
                                    name=function.get("name") or "", arguments="")
            self.items.append(item)
            self.open_item = item
            events.append({"type": "response.output_item.added", "output_index": self._index(item),
                           "item": item.model_dump()})
        item = self.open_item
        assert isinstance(item, FunctionCallItem)
        if arguments:
            item.arguments += arguments
            events.append({"type": "response.function_call_arguments.delta", "item_id": item.id,
                           "output_index": self._index(item), "delta": arguments})
        return events

    def _close(self, incomplete: bool = False) -> list[Event]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        item.status = "incomplete" if incomplete else "completed"
        index = self._index(item)
        if isinstance(item, MessageItem):
            part = item.content[0]
            events = [{"type": "response.output_text.done", "item_id": item.id, "output_index": index,
                       "content_index": 0, "text": part.text, "logprobs": part.logprobs},
                      {"type": "response.content_part.done", "item_id": item.id, "output_index": index,
                       "content_index": 0, "part": part.model_dump()}]
        else:
            events = [{"type": "response.function_call_arguments.done", "item_id": item.id, "output_index": index,
                       "arguments": item.arguments}]
        return events + [{"type": "response.output_item.done", "output_index": index, "item": item.model_dump()}]


def output_messages(items: list[MessageItem | FunctionCallItem]) -> list[dict[str, Any]]:
    """The output as the chat messages a continuation (previous_response_id) replays."""
    text = "".join(part.text for item in items if isinstance(item, MessageItem) for part in item.content)
    calls = [{"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
             for item in items if isinstance(item, FunctionCallItem)]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]


@dataclass
class ResponseRun:
    """A response to generate: `collect()` for the whole Response, `stream()` for its events.
    `on_done` gets each finished Response with its output as chat messages (to store them)."""

    completion: Completion
    echoed: dict[str, Any]
    on_done: Callable[[ResponseObject, list[dict[str, Any]]], None]
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    _sequence: int = field(default=0, init=False)
    """The next event's sequence_number."""
    _streamed: OutputBuilder = field(init=False)
    """The output built so far while streaming."""

    def __post_init__(self) -> None:
        self._streamed = self._builder()

    def _builder(self) -> OutputBuilder:
        def logprobs_of(entries: list[Any]) -> list[dict[str, Any]]:
            found = self.completion.choice_logprobs(entries) if entries else None
            return [entry.model_dump() for entry in (found.content or [])] if found else []

        return OutputBuilder(logprobs_of)

    def _response(self, status: Any, output: list[MessageItem | FunctionCallItem] | None = None,
                  **fields: Any) -> ResponseObject:
        return ResponseObject(id=self.id, created_at=self.created_at, status=status,
                              model=self.completion.engine.model_name, output=output or [],
                              **self.echoed, **fields)

    def _final(self, builder: OutputBuilder, incomplete: bool) -> ResponseObject:
        usage = self.completion.usage()
        details = usage.prompt_tokens_details
        response = self._response(
            "incomplete" if incomplete else "completed", builder.items,
            completed_at=None if incomplete else int(time.time()),
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            usage=ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                total_tokens=usage.total_tokens,
                                input_tokens_details=InputTokensDetails(
                                    cached_tokens=details.cached_tokens if details else 0)))
        self.on_done(response, output_messages(builder.items))
        return response

    def _incomplete(self) -> bool:
        final = self.completion.choices[0].final
        return final is not None and final.finish_reason == FinishReason.LENGTH

    async def collect(self) -> ResponseObject:
        builder = self._builder()
        async with aclosing(self.completion.outputs()) as outputs:
            async for choice, output in outputs:
                if output.finish_reason == FinishReason.ABORT:
                    raise aborted_error()
                builder.feed(choice, output)
        incomplete = self._incomplete()
        builder.finish(incomplete)
        return self._final(builder, incomplete)

    def _frame(self, event: Event) -> bytes:
        event["sequence_number"] = self._sequence
        self._sequence += 1
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return f"event: {event['type']}\ndata: {data}\n\n".encode()

    def shutdown_events(self) -> bytes:
        """What ends a stream cut by the shutdown deadline (http/sse.py): response.failed, as for other failures."""
        return self._frame(self._failed(self._streamed, "server_shutdown", SHUTDOWN_MESSAGE))

    async def stream(self) -> AsyncIterator[bytes]:
        frame = self._frame
        builder = self._streamed
        started = self._response("in_progress").model_dump()
        yield frame({"type": "response.created", "response": started})
        yield frame({"type": "response.in_progress", "response": started})
        try:
            async with aclosing(self.completion.outputs()) as outputs:
                async for choice, output in outputs:
                    if output.finish_reason == FinishReason.ABORT:
                        yield frame(self._failed(builder, "request_aborted", aborted_error().message))
                        return
                    for event in builder.feed(choice, output):
                        yield frame(event)
            incomplete = self._incomplete()
            for event in builder.finish(incomplete):
                yield frame(event)
            final = self._final(builder, incomplete).model_dump()
            yield frame({"type": "response.incomplete" if incomplete else "response.completed", "response": final})
        except Exception as exc:  # headers are sent: the error can only travel as an event
            logger.error("error while streaming %s", self.id, exc_info=exc)
            yield frame(self._failed(builder, "server_error", "The server had an error while processing your "
                                                              "request."))

    def _failed(self, builder: OutputBuilder, code: str, message: str) -> Event:
        response = self._response("failed", builder.items, error={"code": code, "message": message})
        return {"type": "response.failed", "response": response.model_dump()}
