"""Request and response schemas of the OpenAI chat-completions API (the subset we serve)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, ValidationInfo, field_validator, model_serializer, model_validator

from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.chat.response_format import guided_decoding
from nitro_torch.server.chat.sampling_fields import SamplingFields
from nitro_torch.server.chat.tools import ToolFields
from nitro_torch.server.http.schema import LenientModel

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_MESSAGES = 2048
"""More messages are a 400 before any templating work; the context window usually ends a chat long before."""


class ChatMessage(LenientModel):
    role: str
    content: str | list[dict[str, Any]] | None
    """Required, as OpenAI has it, except in assistant messages (a turn of tool calls has none)."""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_may_be_absent(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") == "assistant" and "content" not in data:
            return {**data, "content": None}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _content_is_text_or_parts(cls, value: Any, info: ValidationInfo) -> Any:
        # Validated by hand so that errors point at `messages.N.content` instead of pydantic's union tags.
        if value is None:
            if info.data.get("role", "assistant") != "assistant":
                raise ValueError("content must be a string or a list of content parts, not null")
            return value
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for index, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content part {index} must be an object with a 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"content part {index} of type 'text' needs a string 'text'")
        return value


class ChatCompletionRequest(ToolFields, SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: StrictBool | None = False
    top_logprobs: int | None = None
    response_format: Any = None
    """Structured outputs (validated in response_format.py), with vLLM's extras below."""
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None

    @property
    def requested_max_tokens(self) -> tuple[str, int | None]:
        """(param name, value): `max_completion_tokens` wins over the deprecated `max_tokens`."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def check_supported(self) -> None:
        for param, refused, why in (
            ("modalities", self.modalities not in (None, ["text"]), "this model only produces text"),
            ("audio", self.audio is not None, "this model does not produce audio"),
            ("functions", self.functions is not None, "'functions' is deprecated; send 'tools' instead"),
            ("function_call", self.function_call is not None,
             "'function_call' is deprecated; send 'tool_choice' instead"),
            ("web_search_options", self.web_search_options is not None, "web search is not available"),
        ):
            if refused:
                raise SamplingParamsError(param, why)
        if self.top_logprobs and not self.logprobs:
            raise SamplingParamsError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")

    def to_sampling_params(self) -> SamplingParams:
        self.check_supported()
        max_tokens_param, max_tokens = self.requested_max_tokens
        try:
            params = self.sampling_params(max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        except SamplingParamsError as exc:
            if exc.param == "max_tokens" and max_tokens_param != "max_tokens":
                raise SamplingParamsError(max_tokens_param, str(exc).replace("max_tokens", max_tokens_param)) from None
            raise
        params.guided = guided_decoding(
            response_format=self.response_format, guided_json=self.guided_json, guided_regex=self.guided_regex,
            guided_choice=self.guided_choice, guided_grammar=self.guided_grammar,
            structured_outputs=self.structured_outputs)
        return params


# ---- responses -----------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (or from another choice of the same request)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
        details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens is not None else None
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_tool_calls(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nitro_torch"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
