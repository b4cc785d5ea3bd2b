"""POST /v1/completions: OpenAI's legacy text completions (vLLM-compatible), plain or streamed.

Every prompt gets `n` choices, each its own engine request (index = prompt_index * n + i); their streams run
concurrently and are merged in arrival order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, StrictBool, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from nitro_torch.engine.client import ContextLengthExceeded, check_context_length, generate_choices
from nitro_torch.engine.outputs import FinishReason, RequestOutput
from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.chat.generation import SYSTEM_FINGERPRINT
from nitro_torch.server.chat.protocol import Usage
from nitro_torch.server.chat.request_budget import check_budget_of, client_of
from nitro_torch.server.chat.sampling_fields import SamplingFields
from nitro_torch.server.http.context import (
    check_token_ids,
    check_token_list,
    get_engine,
    parse_body,
    respond,
)
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.http.sse import DONE_EVENT, INTERNAL_ERROR_EVENT, sse_event
from nitro_torch.server.model_names import check_model_name

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

logger = logging.getLogger("nitro_torch.server")

Prompt = str | list[int]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: StrictBool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # Checked by hand so that errors say what a prompt may be instead of listing pydantic's union branches.
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                             "lists of token ids, and not empty")
        if all(isinstance(item, str) for item in value) or _is_token_list(value):
            return value
        if all(_is_token_list(item) for item in value):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                         "of token ids")

    @property
    def prompts(self) -> list[Prompt]:
        if isinstance(self.prompt, str) or _is_token_list(self.prompt):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        if self.echo:
            raise SamplingParamsError("echo", "'echo' is not supported")
        if self.logprobs is not None:
            raise SamplingParamsError("logprobs", "'logprobs' is not supported for text completions")
        if self.suffix:
            raise SamplingParamsError("suffix", "'suffix' is not supported")
        if self.best_of is not None:
            if self.best_of < self.num_choices:
                raise SamplingParamsError("best_of", "'best_of' must be at least 'n'")
            if self.best_of > self.num_choices:
                raise SamplingParamsError("best_of", "'best_of' greater than 'n' is not supported")

    def to_sampling_params(self) -> SamplingParams:
        self.check_supported()
        return self.sampling_params(self.max_tokens)


def prompt_token_lists(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Text prompts tokenized (with the model's special tokens, as vLLM does); token prompts checked."""
    vocab_size = len(tokenizer)
    token_lists = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_token_list(ids, vocab_size, "prompt", f"Prompt {index}")
        token_lists.append(ids)
    return token_lists


def check_prompt_fits(index: int, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    try:
        check_context_length(num_prompt_tokens, max_tokens, max_model_len)
    except ContextLengthExceeded as exc:
        message = str(exc).replace("the messages", "the prompt")
        if index:
            message = f"Prompt {index}: {message}"
        raise APIError(400, message, param="prompt", code="context_length_exceeded") from None


# ---- responses -----------------------------------------------------------------------------------------


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None


@dataclasses.dataclass
class TextCompletion:
    """All choices of one completions request in flight."""

    engine: EngineClient
    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    include_usage: bool = False
    client: str = ""
    """Who sent it: the engine shares its steps fairly between clients."""
    id: str = dataclasses.field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._output_tokens = [0] * (len(self.prompts) * self.n)
        self._cached_tokens = [0] * (len(self.prompts) * self.n)

    async def outputs(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(choice index, delta) of all choices as they arrive; closing it aborts the unfinished ones."""
        choices = generate_choices(self.engine, self.prompts, self.params, self.n, lambda i: f"{self.id}-{i}",
                                   self.client)
        async with aclosing(choices) as merged:
            async for index, output in merged:
                if output.finished:
                    self._output_tokens[index] = output.num_output_tokens
                    self._cached_tokens[index] = output.num_cached_tokens
                yield index, output

    def usage(self) -> Usage:
        """Each prompt counts once, however many choices it has (its cached tokens: the fewest of a choice)."""
        n = self.n
        cached = sum(min(self._cached_tokens[p * n:(p + 1) * n]) for p in range(len(self.prompts)))
        return Usage.of(sum(len(ids) for ids in self.prompts), sum(self._output_tokens), cached)

    async def collect(self) -> CompletionResponse:
        texts: list[list[str]] = [[] for _ in self._output_tokens]
        reasons: list[str | None] = [None] * len(self._output_tokens)
        async with aclosing(self.outputs()) as outputs:
            async for index, output in outputs:
                texts[index].append(output.new_text)
                if output.finished:
                    if output.finish_reason == FinishReason.ABORT:
                        raise _aborted()
                    reasons[index] = _finish_reason(output)
        choices = [CompletionChoice(text="".join(parts), index=i, finish_reason=reasons[i])
                   for i, parts in enumerate(texts)]
        return CompletionResponse(id=self.id, created=self.created, model=self.engine.model_name,
                                  system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=self.usage())

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        chunk = CompletionResponse(id=self.id, created=self.created, model=self.engine.model_name,
                                   system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=usage)
        payload = chunk.model_dump()
        if not self.include_usage:
            del payload["usage"]
        return sse_event(payload)

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            completed = False
            async with aclosing(self.outputs()) as outputs:
                async for index, output in outputs:
                    if output.finish_reason == FinishReason.ABORT:
                        yield sse_event(_aborted().body())
                        break
                    if output.new_text or output.finished:
                        reason = _finish_reason(output) if output.finished else None
                        yield self._chunk([CompletionChoice(text=output.new_text, index=index, finish_reason=reason)])
                else:
                    completed = True
            if completed and self.include_usage:
                yield self._chunk([], usage=self.usage())
        except Exception as exc:  # headers are sent: the error can only travel as an event
            logger.error("error while streaming %s", self.id, exc_info=exc)
            yield INTERNAL_ERROR_EVENT
        yield DONE_EVENT


def _finish_reason(output: RequestOutput) -> str:
    return output.finish_reason.value if output.finish_reason else "stop"


def _aborted() -> APIError:
    return APIError(503, "The request was aborted by the server.", code="request_aborted")


async def create_completion(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_body(request, CompletionRequest)
    check_model_name(request, engine, body.model)
    params = body.to_sampling_params()  # SamplingParamsError becomes a 400 in http/errors.py
    check_token_ids(params, len(engine.tokenizer))
    prompts = prompt_token_lists(engine.tokenizer, body.prompts)
    for index, ids in enumerate(prompts):
        check_prompt_fits(index, len(ids), params.max_tokens, engine.max_model_len)
    check_budget_of(request, [len(ids) for ids in prompts], body.num_choices, params.max_tokens, params.min_tokens,
                    engine.max_model_len)
    completion = TextCompletion(engine, prompts, params, n=body.num_choices, include_usage=body.include_usage,
                                client=client_of(request))
    return await respond(request, completion, bool(body.stream))


routes = [Route("/v1/completions", create_completion, methods=["POST"])]
