"""The OpenAI Responses API's request and response schemas, and its translation into a ChatCompletionRequest:
every response runs through the one chat path (chat/preprocess.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, ValidationError, field_validator

from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.chat.tools import FunctionDefinition, ToolDefinition
from nitro_torch.server.http.errors import APIError, validation_error
from nitro_torch.server.http.schema import LenientModel

INCLUDABLE = ("file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
              "message.input_image.image_url", "computer_call_output.output.image_url",
              "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs")
"""OpenAI's `include` values; only the logprobs have an effect, the others name items this server never makes."""
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
MEDIA_PARTS = {"input_image": "images", "input_file": "files", "input_audio": "audio"}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class TextConfig(LenientModel):
    format: dict[str, Any] | None = None
    """`verbosity` is ignored: unknown fields are."""


class ResponsesRequest(LenientModel):
    model: str | None = ""
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: StrictBool | None = None
    stream: StrictBool | None = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    background: StrictBool | None = None
    conversation: Any = None
    prompt: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_is_text_or_items(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | list):
            raise ValueError("input must be a string or a list of input items")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_fits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > MAX_METADATA_PAIRS:
                raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
            if any(len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in value.items()):
                raise ValueError(f"metadata keys have at most {MAX_METADATA_KEY} characters and values at most "
                                 f"{MAX_METADATA_VALUE}")
        return value

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or []) or self.top_logprobs is not None

    def check_supported(self) -> None:
        for param, refused, why in (
            ("background", bool(self.background), "Background responses are not supported; wait for the "
                                                  "answer or stream it."),
            ("conversation", self.conversation is not None, "Conversations are not supported; continue a "
                                                            "stored response with 'previous_response_id'."),
            ("prompt", self.prompt is not None, "Saved prompts are not supported; send 'instructions' and "
                                                "'input' instead."),
            ("reasoning", bool(self.reasoning and (self.reasoning.get("summary") or
                                                   self.reasoning.get("generate_summary"))),
             "Reasoning summaries are not supported: this server produces no reasoning items ('effort' is "
             "accepted and has no effect)."),
        ):
            if refused:
                raise invalid(param, why, code="unsupported_parameter")
        unknown = [value for value in self.include or [] if value not in INCLUDABLE]
        if unknown:
            raise invalid("include", f"Invalid value for 'include': '{unknown[0]}'. Supported values are: "
                                     f"{', '.join(INCLUDABLE)}.")

    def to_chat(self, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
        """The chat request that runs this response after `history` (a stored conversation), and the chat
        messages of this request's own input."""
        self.check_supported()
        new = input_messages(self.input)
        if not new and not history:
            raise invalid("input", "Missing required parameter: 'input'.", code="missing_required_parameter")
        system = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        tools = chat_tools(self.tools)
        fields: dict[str, Any] = {
            "model": self.model, "messages": [*system, *history, *new], "tools": tools,
            "tool_choice": chat_tool_choice(self.tool_choice, bool(tools)),
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": response_format(self.text.format if self.text else None),
            "max_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "user": self.user,
        }
        if self.wants_logprobs:
            fields.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        try:
            return ChatCompletionRequest.model_validate(fields), new
        except ValidationError as exc:  # our own translation is valid; the client's text may not be
            error = validation_error(exc)
            raise invalid("input", error.message) from None


def _text_of_parts(parts: list[Any], param: str) -> list[dict[str, Any]]:
    """Responses content parts as chat `text` parts; media are refused naming the part."""
    texts = []
    for index, part in enumerate(parts):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise invalid(where, f"This model does not accept {MEDIA_PARTS[kind]} (content part of type "
                                 f"'{kind}'); send text parts only.")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append({"type": "text", "text": part["refusal"]})
        elif kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append({"type": "text", "text": part["text"]})
        else:
            raise invalid(where, f"Content part {index} must be an object of type 'input_text' (or "
                                 "'output_text') with a string 'text'.")
    return texts


def _content(value: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _text_of_parts(value, param)
    raise invalid(param, f"'{param}' must be a string or a list of content parts.")


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        code = "missing_required_parameter" if value is None else "invalid_value"
        raise invalid(f"{param}.{key}", f"'{param}.{key}' must be a string.", code=code)
    return value


def input_messages(value: str | list[Any] | None) -> list[dict[str, Any]]:
    """Responses input items as chat messages: a function_call joins the assistant turn before it (as one
    chat message holds text and tool calls); a function_call_output is a `tool` message."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise invalid(param, f"'{param}' must be an input item object.")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in INPUT_ROLES:
                raise invalid(f"{param}.role", f"Invalid role {role!r} in '{param}'; supported roles: "
                                               f"{', '.join(INPUT_ROLES)}.")
            messages.append({"role": role, "content": _content(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", param), "type": "function",
                    "function": {"name": _string(item, "name", param),
                                 "arguments": _string(item, "arguments", param)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*last.get("tool_calls", []), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                             "content": _content(item.get("output"), f"{param}.output")})
        elif kind == "reasoning":
            continue  # another model's reasoning, replayed by a client: these models would not read it
        elif kind == "item_reference":
            raise invalid(param, "Item references are not supported; send the items themselves, or continue a "
                                 "stored response with 'previous_response_id'.")
        else:
            raise invalid(f"{param}.type", f"Input items of type {kind!r} are not supported; this server takes "
                                           "'message', 'function_call' and 'function_call_output' items.")
    return messages


def chat_tools(tools: list[Any] | None) -> list[ToolDefinition] | None:
    """Responses' flat function tools as chat tools; built-in tools are refused naming the tool."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise invalid(f"{param}.type", f"Tools of type {kind!r} are not supported: this server offers no "
                                           "built-in tools (web search, file search, ...), only 'function' "
                                           "tools.", code="unsupported_parameter")
        try:
            function = FunctionDefinition.model_validate(tool)
        except ValidationError as exc:
            error = validation_error(exc)
            raise invalid(f"{param}.{error.param}", error.message.replace(f"'{error.param}'", f"'{param}."
                                                                          f"{error.param}'")) from None
        converted.append(ToolDefinition(type="function", function=function))
    return converted


def chat_tool_choice(value: str | dict[str, Any] | None, has_tools: bool) -> str | dict[str, Any] | None:
    if value in ("auto", "none") and not has_tools:
        return None  # Responses' default is "auto" with or without tools; clients send it always
    if not isinstance(value, dict):
        return value
    if value.get("type") != "function" or not isinstance(value.get("name"), str):
        raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": "
                                     "\"function\", \"name\": ...}; other tool choices are not supported.")
    return {"type": "function", "function": {"name": value["name"]}}


def response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    kind = None if value is None else value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise invalid("text.format.type", "'text.format.type' must be one of text, json_object, json_schema.")
    assert value is not None
    if "schema" not in value:
        raise invalid("text.format.schema", "Missing required parameter: 'text.format.schema'.",
                      code="missing_required_parameter")
    spec = {key: value[key] for key in ("name", "schema", "description", "strict") if key in value}
    return {"type": "json_schema", "json_schema": spec}


# ---- responses -----------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class MessageItem(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[MessageItem | FunctionCallItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    instructions: str | None
    max_output_tokens: int | None
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    top_logprobs: int | None
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    reasoning: dict[str, Any]
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    metadata: dict[str, str]
    user: str | None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


def echoed_fields(body: ResponsesRequest, store: bool) -> dict[str, Any]:
    """What a Response repeats of its request, with OpenAI's defaults filled in."""
    tools = [{"type": "function", "name": t.function.name, "description": t.function.description,
              "parameters": t.function.parameters, "strict": t.function.strict} for t in chat_tools(body.tools) or []]
    return {
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "previous_response_id": body.previous_response_id, "store": store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "top_logprobs": body.top_logprobs,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto", "tools": tools,
        "text": {"format": (body.text.format if body.text and body.text.format else {"type": "text"})},
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
        "metadata": body.metadata or {}, "user": body.user,
    }
