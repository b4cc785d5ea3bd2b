"""Request and response schemas of Anthropic's Messages API (the subset we serve).

Content blocks, `system` and `tools` are checked block by block in convert.py, so that a bad block is a 400 that
names it (`messages.2.content.1: ...`) instead of pydantic's union errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool

from nitro_torch.server.chat.protocol import MAX_MESSAGES
from nitro_torch.server.http.schema import LenientModel

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageParam(LenientModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolChoiceParam(LenientModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class CountTokensRequest(LenientModel):
    """What shapes the prompt: the body of /v1/messages/count_tokens, and the base of a messages request."""

    model: str | None = ""
    messages: list[MessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: dict[str, Any] | None = None
    """Only `disabled` and `adaptive` (the model decides: this one never thinks); `enabled` is a 400."""
    output_config: dict[str, Any] | None = None
    """`format` (a JSON schema the answer follows, by constrained decoding); `effort` has no effect."""
    mcp_servers: list[Any] | None = None
    container: Any = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    stream: StrictBool | None = False


# ---- responses -----------------------------------------------------------------------------------------


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    """Prompt tokens computed for this request: as Anthropic counts, cache reads are not among them."""
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
