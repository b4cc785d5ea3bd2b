"""Chat messages -> prompt token ids through the model's own chat template."""

from __future__ import annotations

from typing import Any, Sequence

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from nitro_torch.server.errors import APIError
from nitro_torch.server.protocol import CHAT_ROLES, ChatMessage

_ROLE_ALIASES = {"developer": "system"}
TEXT_PART_SEPARATOR = "\n"


def message_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    """A message's content as one string; text parts are joined, other part types are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"messages[{index}]: content parts of type '{part.get('type')}' are not "
                                "supported by this text-only model", param="messages", code="invalid_value")
        texts.append(part["text"])
    return TEXT_PART_SEPARATOR.join(texts)


def to_template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    converted = []
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise APIError(400, f"Invalid role '{message.role}' in messages[{index}]; supported roles: "
                                f"{', '.join(CHAT_ROLES)}.", param="messages", code="invalid_value")
        entry: dict[str, Any] = {"role": _ROLE_ALIASES.get(message.role, message.role),
                                 "content": message_text(message.content, index)}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            entry["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        converted.append(entry)
    return converted


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> list[int]:
    """The templated prompt ending with the assistant's generation prompt, as token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(500, "The loaded model has no chat template, so it cannot serve chat completions.",
                       type="server_error", code="no_chat_template")
    try:
        ids = tokenizer.apply_chat_template(
            to_template_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except TemplateError as exc:
        # Templates raise on conversations they refuse (e.g. roles that do not alternate).
        raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages",
                       code="invalid_value") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(token) for token in ids]
