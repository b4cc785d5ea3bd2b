"""One chat completion in flight: n engine streams (one per choice) turned into an OpenAI response or SSE chunks.

Choice 0 is the parent request; choices 1..n-1 are forks of it in the engine, so the prompt is prefilled once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nitro_torch import __version__
from nitro_torch.engine.client import generate_choices
from nitro_torch.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from nitro_torch.sampling import SamplingParams
from nitro_torch.server.chat.logprobs import TokenTexts, to_openai_logprobs
from nitro_torch.server.chat.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    Usage,
)
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.http.sse import DONE_EVENT, INTERNAL_ERROR_EVENT, sse_event

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

logger = logging.getLogger("nitro_torch.server")

SYSTEM_FINGERPRINT = f"fp_nitro_torch_{__version__}"
TOOL_CALLS_FINISH_REASON = "tool_calls"


class ToolCallLike(Protocol):
    def to_openai(self) -> dict[str, Any]: ...


class OutputParser(Protocol):
    """Splits generated text into message content and tool calls (tools.py's ToolCallStreamParser)."""

    def feed(self, text: str) -> tuple[str, list[Any]]: ...

    def finish(self) -> tuple[str, list[Any]]: ...

    @property
    def tool_calls(self) -> list[Any]: ...


def aborted_error() -> APIError:
    return APIError(503, "The request was aborted by the server.", code="request_aborted")


@dataclass
class Choice:
    """One choice's progress: its engine request and what it has produced so far."""

    index: int
    request_id: str
    parser: OutputParser | None = None
    content: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    final: RequestOutput | None = None

    @property
    def finish_reason(self) -> str:
        assert self.final is not None
        reason = self.final.finish_reason.value if self.final.finish_reason else "stop"
        if reason == "stop" and self.parser is not None and self.parser.tool_calls:
            return TOOL_CALLS_FINISH_REASON
        return reason

    def split(self, text: str, last: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content, tool-call deltas) for newly generated text."""
        if self.parser is None:
            return text, []
        content, calls = self.parser.feed(text) if text else ("", [])
        if last:
            tail, more = self.parser.finish()
            content, calls = content + tail, calls + more
        return content, [call.to_openai() for call in calls]


@dataclass
class Completion:
    """One chat completion in flight: ids, the engine streams and what has been generated so far."""

    engine: EngineClient
    texts: TokenTexts
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    include_usage: bool = False
    continuous_usage: bool = False
    parser_factory: Callable[[], OutputParser] | None = None
    client: str = ""
    """Who sent it: the engine shares its steps fairly between clients."""
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(init=False)

    def __post_init__(self) -> None:
        self.choices = [
            Choice(i, self.id if i == 0 else f"{self.id}-{i}", self.parser_factory() if self.parser_factory else None)
            for i in range(self.n)
        ]

    async def outputs(self) -> AsyncGenerator[tuple[Choice, RequestOutput], None]:
        """Every choice's deltas as they come; leaving early (or a failure) aborts the unfinished choices."""
        choices = generate_choices(self.engine, [self.prompt_ids], self.params, self.n,
                                   lambda i: self.choices[i].request_id, self.client)
        async with aclosing(choices) as merged:
            async for index, output in merged:
                yield self._record(self.choices[index], output), output

    @staticmethod
    def _record(choice: Choice, output: RequestOutput) -> Choice:
        choice.num_output_tokens = output.num_output_tokens
        choice.num_cached_tokens = output.num_cached_tokens
        if output.finished:
            choice.final = output
        return choice

    def usage(self) -> Usage:
        """The prompt counts once however many choices share it."""
        completion_tokens = sum(c.num_output_tokens for c in self.choices)
        return Usage.of(len(self.prompt_ids), completion_tokens, self.choices[0].num_cached_tokens)

    def choice_logprobs(self, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if self.params.logprobs is None:
            return None
        return to_openai_logprobs(entries, self.texts)

    async def collect(self) -> ChatCompletionResponse:
        tool_calls: dict[int, list[dict[str, Any]]] = {c.index: [] for c in self.choices}
        async with aclosing(self.outputs()) as outputs:
            async for choice, output in outputs:
                if output.finish_reason == FinishReason.ABORT:
                    raise aborted_error()
                content, _ = choice.split(output.new_text, last=output.finished)
                choice.content.append(content)
                choice.logprobs.extend(output.logprobs or [])
        for choice in self.choices:
            if choice.parser is not None:
                tool_calls[choice.index] = [call.to_openai() for call in choice.parser.tool_calls]
        result = [
            ChatCompletionChoice(
                index=c.index,
                message=AssistantMessage(content="".join(c.content) or (None if tool_calls[c.index] else ""),
                                         tool_calls=tool_calls[c.index] or None),
                logprobs=self.choice_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in self.choices
        ]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.engine.model_name,
                                      system_fingerprint=SYSTEM_FINGERPRINT, choices=result, usage=self.usage())

    def _chunk(self, choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> bytes:
        if usage is None and self.continuous_usage:
            usage = self.usage()
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.engine.model_name,
                                    system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=usage)
        payload = chunk.model_dump()
        if usage is None and not self.include_usage:  # OpenAI: "usage": null on every chunk but the last
            del payload["usage"]
        return sse_event(payload)

    def _delta_chunks(self, choice: Choice, output: RequestOutput) -> list[bytes]:
        """The content/tool-call chunk of this delta (if any), then, like OpenAI, the finish chunk on its own."""
        choice.logprobs.extend(output.logprobs or [])
        content, calls = choice.split(output.new_text, last=output.finished)
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        chunks = []
        if delta:
            logprobs = self.choice_logprobs(choice.logprobs) if choice.logprobs else None
            choice.logprobs = []
            chunks.append(self._chunk([ChatCompletionChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)]))
        if output.finished:
            logprobs = self.choice_logprobs(choice.logprobs) if choice.logprobs else None
            chunks.append(self._chunk([ChatCompletionChunkChoice(index=choice.index, delta={}, logprobs=logprobs,
                                                                 finish_reason=choice.finish_reason)]))
        return chunks

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            for choice in self.choices:
                yield self._chunk([ChatCompletionChunkChoice(index=choice.index,
                                                             delta={"role": "assistant", "content": ""})])
            async with aclosing(self.outputs()) as outputs:
                async for choice, output in outputs:
                    if output.finish_reason == FinishReason.ABORT:
                        yield sse_event(aborted_error().body())
                        break
                    for chunk in self._delta_chunks(choice, output):
                        yield chunk
                else:
                    if self.include_usage:
                        yield self._chunk([], usage=self.usage())
        except Exception as exc:  # headers are sent: the error can only travel as an event
            logger.error("error while streaming %s", self.id, exc_info=exc)
            yield INTERNAL_ERROR_EVENT
        yield DONE_EVENT
