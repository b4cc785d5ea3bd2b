"""Request and response schemas of the OpenAI chat-completions API (the subset we serve)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nitro_torch.sampling import SamplingParams, SamplingParamsError

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
SEED_RANGE = (-(2**63), 2**64 - 1)


class _Lenient(BaseModel):
    """Unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_is_text_or_parts(cls, value: Any) -> Any:
        # Validated by hand so that errors point at `messages.N.content` instead of pydantic's union tags.
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for index, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content part {index} must be an object with a 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"content part {index} of type 'text' needs a string 'text'")
        return value


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class ChatCompletionRequest(_Lenient):
    model: str | None = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    logprobs: bool | None = False
    top_logprobs: int | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_is_string_or_list(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ValueError("stop must be a string or a list of strings")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> tuple[str, int | None]:
        """(param name, value): `max_completion_tokens` wins over the deprecated `max_tokens`."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def check_supported(self) -> None:
        if self.n is not None and self.n != 1:
            message = "n > 1 is not supported yet" if self.n > 1 else "'n' must be at least 1"
            raise SamplingParamsError("n", message)
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise SamplingParamsError("seed", "'seed' must fit in 64 bits")
        if self.top_logprobs and not self.logprobs:
            raise SamplingParamsError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")

    def token_biases(self) -> dict[int, float]:
        """OpenAI sends token ids as JSON object keys, i.e. strings."""
        biases: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                biases[int(key)] = float(bias)
            except ValueError:
                raise SamplingParamsError("logit_bias", f"'logit_bias' keys must be token ids, not {key!r}") from None
        return biases

    def to_sampling_params(self) -> SamplingParams:
        self.check_supported()
        max_tokens_param, max_tokens = self.requested_max_tokens
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=_or(self.temperature, 1.0),
                top_p=_or(self.top_p, 1.0),
                top_k=_or(self.top_k, 0),
                min_p=_or(self.min_p, 0.0),
                seed=self.seed,
                presence_penalty=_or(self.presence_penalty, 0.0),
                frequency_penalty=_or(self.frequency_penalty, 0.0),
                repetition_penalty=_or(self.repetition_penalty, 1.0),
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=bool(self.ignore_eos),
                min_tokens=_or(self.min_tokens, 0),
                logprobs=_or(self.top_logprobs, 0) if self.logprobs else None,
                include_stop_str_in_output=bool(self.include_stop_str_in_output),
                skip_special_tokens=_or(self.skip_special_tokens, True),
                logit_bias=self.token_biases(),
            )
        except SamplingParamsError as exc:
            if exc.param == "max_tokens" and max_tokens_param != "max_tokens":
                raise SamplingParamsError(max_tokens_param, str(exc).replace("max_tokens", max_tokens_param)) from None
            raise


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# ---- responses -----------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


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
    delta: dict[str, str]
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


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
