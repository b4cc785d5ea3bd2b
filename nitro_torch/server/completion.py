"""One chat completion in flight: the engine stream turned into an OpenAI response or SSE chunks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nitro_torch import __version__
from nitro_torch.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from nitro_torch.sampling import SamplingParams
from nitro_torch.server.errors import APIError
from nitro_torch.server.logprobs import TokenTexts, to_openai_logprobs
from nitro_torch.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    Usage,
)
from nitro_torch.server.streaming import DONE_EVENT, sse_event

if TYPE_CHECKING:
    from nitro_torch.engine.async_engine import AsyncEngine

logger = logging.getLogger("nitro_torch.server")

SYSTEM_FINGERPRINT = f"fp_nitro_torch_{__version__}"


@dataclass
class Completion:
    """One chat completion in flight: ids, the engine stream and what has been generated so far."""

    engine: AsyncEngine
    texts: TokenTexts
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    final: RequestOutput | None = None

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        stream = self.engine.generate(self.id, self.prompt_ids, self.params)
        try:
            async for output in stream:
                if output.finished:
                    self.final = output
                yield output
        finally:
            await stream.aclose()
            if self.final is None:
                self._abort()

    def _abort(self) -> None:
        try:
            self.engine.abort(self.id)
        except Exception:  # aborting is best effort: the request may already be gone
            logger.debug("abort of %s failed", self.id, exc_info=True)

    def usage(self) -> Usage:
        assert self.final is not None
        return Usage.of(len(self.prompt_ids), self.final.num_output_tokens)

    def logprobs(self, entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if self.params.logprobs is None:
            return None
        return to_openai_logprobs(entries or [], self.texts)

    async def collect(self) -> ChatCompletionResponse:
        text_parts: list[str] = []
        entries: list[TokenLogprob] = []
        async with aclosing(self.outputs()) as outputs:
            async for output in outputs:
                text_parts.append(output.new_text)
                entries.extend(output.logprobs or [])
        assert self.final is not None
        if self.final.finish_reason == FinishReason.ABORT:
            raise APIError(503, "The request was aborted by the server.", code="request_aborted")
        choice = ChatCompletionChoice(
            message=AssistantMessage(content="".join(text_parts)),
            logprobs=self.logprobs(entries),
            finish_reason=self.final.finish_reason.value if self.final.finish_reason else "stop",
        )
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.engine.model_name,
                                      system_fingerprint=SYSTEM_FINGERPRINT, choices=[choice], usage=self.usage())

    def _chunk(self, choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.engine.model_name,
                                    system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=usage)
        payload = chunk.model_dump()
        if not self.include_usage:
            del payload["usage"]
        return sse_event(payload)

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            yield self._chunk([ChatCompletionChunkChoice(delta={"role": "assistant", "content": ""})])
            pending_logprobs: list[TokenLogprob] = []
            async with aclosing(self.outputs()) as outputs:
                async for output in outputs:
                    pending_logprobs.extend(output.logprobs or [])
                    if output.new_text:
                        yield self._chunk([ChatCompletionChunkChoice(
                            delta={"content": output.new_text}, logprobs=self.logprobs(pending_logprobs))])
                        pending_logprobs = []
                    if output.finished:
                        if output.finish_reason == FinishReason.ABORT:
                            yield _error_event(APIError(503, "The request was aborted by the server.",
                                                        code="request_aborted"))
                            break
                        yield self._chunk([ChatCompletionChunkChoice(
                            delta={}, logprobs=self.logprobs(pending_logprobs) if pending_logprobs else None,
                            finish_reason=output.finish_reason.value if output.finish_reason else "stop")])
                        if self.include_usage:
                            yield self._chunk([], usage=self.usage())
        except Exception as exc:  # headers are sent: the error can only travel as an event
            logger.error("error while streaming %s", self.id, exc_info=exc)
            yield _error_event(APIError(500, "The server had an error while processing your request.",
                                        type="server_error", code="internal_error"))
        yield DONE_EVENT


def _error_event(error: APIError) -> bytes:
    return sse_event(error.body())
