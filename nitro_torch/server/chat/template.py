"""Chat messages -> prompt token ids: the model's chat template (or --chat-template), else Nitro's prompt prefixes.

Prompt-prefix mode is Nitro's: the prompt starts with `pre_prompt`, a system message is put first behind
`system_prompt`, user and assistant turns follow behind `user_prompt` / `ai_prompt`, and `ai_prompt` ends it.
It is used when prefixes are configured (e.g. by Nitro's loadmodel) or when the model has no chat template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from nitro_torch.config import ChatConfig
from nitro_torch.server.chat.control_tokens import (
    control_token_pattern,
    encode_marked,
    holds_control_token,
    mark,
    special_token_frame,
)
from nitro_torch.server.chat.protocol import CHAT_ROLES, ChatMessage
from nitro_torch.server.http.errors import APIError

_ROLE_ALIASES = {"developer": "system"}
TEXT_PART_SEPARATOR = "\n"
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
})
_MEDIA_PARTS = {"image_url": "images", "input_image": "images", "input_audio": "audio", "file": "files"}


@dataclass(frozen=True)
class PromptPrefixes:
    """Nitro's defaults (llama.cpp server's USER/ASSISTANT format) for the fields left unset."""

    system_prompt: str = "ASSISTANT's RULE: "
    user_prompt: str = "USER: "
    ai_prompt: str = "ASSISTANT: "
    pre_prompt: str = ""

    @classmethod
    def from_config(cls, chat: ChatConfig) -> PromptPrefixes:
        given = {name: getattr(chat, name) for name in ("system_prompt", "user_prompt", "ai_prompt", "pre_prompt")}
        return cls(**{name: value for name, value in given.items() if value is not None})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        system = "".join(self.system_prompt + m["content"] for m in messages if m["role"] == "system")
        turns = [self.pre_prompt]
        for message in messages:
            if message["role"] == "user":
                turns.append(self.user_prompt + message["content"])
            elif message["role"] == "assistant":
                turns.append(self.ai_prompt + message["content"])
            elif message["role"] != "system":
                turns.append(f"{message['role']}: {message['content']}")
        if add_generation_prompt:
            turns.append(self.ai_prompt)
        return system + "".join(turns)

    @property
    def stop(self) -> list[str]:
        """The next user turn ends the answer (Nitro did the same)."""
        marker = self.user_prompt.strip()
        return [marker] if marker else []


def uses_prompt_prefixes(tokenizer: PreTrainedTokenizerBase, chat: ChatConfig) -> bool:
    explicit = any(getattr(chat, n) is not None for n in ("system_prompt", "user_prompt", "ai_prompt", "pre_prompt"))
    return explicit or not getattr(tokenizer, "chat_template", None)


def message_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    """A message's content as one string; text parts are joined, other part types are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind in _MEDIA_PARTS:
            raise APIError(400, f"messages[{index}]: this model does not accept {_MEDIA_PARTS[kind]} "
                                f"(content part of type '{kind}'); send text parts only.",
                           param="messages", code="invalid_value")
        if kind != "text":
            raise APIError(400, f"messages[{index}]: unknown content part type '{kind}'; this model accepts "
                                "'text' parts.", param="messages", code="invalid_value")
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


@dataclass(frozen=True)
class ChatFormatter:
    """How one loaded model turns conversations into prompts."""

    tokenizer: PreTrainedTokenizerBase
    prefixes: PromptPrefixes | None = None
    """Set in prompt-prefix mode; None means the chat template is used."""
    special_tokens_in_content: bool = False
    """Control tokens written in messages are the tokens themselves (the old, forgeable way); off, they are text."""

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, chat: ChatConfig) -> ChatFormatter:
        prefixes = PromptPrefixes.from_config(chat) if uses_prompt_prefixes(tokenizer, chat) else None
        return cls(tokenizer, prefixes, chat.special_tokens_in_content)

    @property
    def extra_stop(self) -> list[str]:
        return self.prefixes.stop if self.prefixes else []

    def prompt_ids(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                   continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of the conversation, ending with the assistant's generation prompt (or its open message)."""
        if continue_final_message and (add_generation_prompt or not messages or messages[-1]["role"] != "assistant"):
            raise APIError(400, "'continue_final_message' needs a final assistant message and "
                                "'add_generation_prompt': false.", param="continue_final_message",
                           code="invalid_value")
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or {}))
        if reserved:
            raise APIError(400, f"'chat_template_kwargs' may not set {', '.join(reserved)}; use the request fields.",
                           param="chat_template_kwargs", code="invalid_value")
        template = None if self.prefixes is not None else getattr(self.tokenizer, "chat_template", None)
        # Only conversations that hold a control token take the marking path, so every other prompt keeps
        # exactly the ids of the plain template.
        pattern = control_token_pattern(self.tokenizer, template)
        sanitize = not self.special_tokens_in_content and holds_control_token(
            [messages, tools, template_kwargs], pattern)
        try:
            if self.prefixes is not None:
                if tools:
                    raise APIError(400, "This model has no chat template, so it cannot be given tools.",
                                   param="tools", code="invalid_value")
                return self._prefixed_ids(self.prefixes, messages, add_generation_prompt,
                                          pattern if sanitize else None)
            return self._template_ids(messages, add_generation_prompt, continue_final_message, tools,
                                      template_kwargs or {}, pattern if sanitize else None)
        except TemplateError as exc:
            # Templates raise on conversations they refuse (e.g. roles that do not alternate).
            raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages",
                           code="invalid_value") from None
        except (TypeError, ValueError) as exc:
            # Also a control token that the tokenizer cannot spell as plain text.
            raise APIError(400, f"The chat template could not render the request: {exc}", param="messages",
                           code="invalid_value") from None

    def _template_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      continue_final_message: bool, tools: list[dict[str, Any]] | None,
                      template_kwargs: dict[str, Any], as_text: re.Pattern[str] | None) -> list[int]:
        """`as_text`: the control tokens to encode as text where the messages, tools or variables hold them."""
        if as_text is not None:
            messages, tools, template_kwargs = mark([messages, tools, template_kwargs], as_text)
        # tools: transformers asks for a list[dict | Callable], which a list[dict[str, Any]] is not (invariance).
        ids: Any = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt,  # type: ignore[arg-type]
            continue_final_message=continue_final_message, tokenize=as_text is None, return_dict=False,
            **template_kwargs,
        )
        if as_text is not None:
            return encode_marked(self.tokenizer, ids)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(token) for token in ids]

    def _prefixed_ids(self, prefixes: PromptPrefixes, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      as_text: re.Pattern[str] | None) -> list[int]:
        if as_text is None:
            text = prefixes.render(messages, add_generation_prompt)
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        # The prefixes are the operator's and may hold control tokens; only the messages' own are text.
        body = encode_marked(self.tokenizer, prefixes.render(mark(messages, as_text), add_generation_prompt))
        before, after = special_token_frame(self.tokenizer)
        return before + body + after


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                     chat: ChatConfig | None = None) -> list[int]:
    """The conversation as the model's prompt, ending with the assistant's generation prompt."""
    formatter = ChatFormatter.from_config(tokenizer, chat or ChatConfig())
    return formatter.prompt_ids(to_template_messages(messages))
