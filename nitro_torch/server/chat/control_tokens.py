"""Control tokens a client writes inside a message are text, not the tokens themselves (as OpenAI treats them).

The messages' control-token strings are wrapped in private-use markers before the template renders them; the
rendered prompt is then encoded piece by piece: the template's own text (and its control tokens) as usual, each
marked string as plain text. The same idea as transformers' `sanitize_control_tokens` (5.25+), kept here so that
every supported transformers version behaves alike.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

MARK_START = "\ue000"
MARK_END = "\ue001"
_MARKED = re.compile(f"{MARK_START}([^{MARK_START}{MARK_END}]*){MARK_END}")


def control_token_pattern(tokenizer: PreTrainedTokenizerBase, template: str | None) -> re.Pattern[str]:
    """The added tokens a client's text could forge: the special ones, and those the chat template writes."""
    source = template or ""
    tokens = {token.content for token in tokenizer.added_tokens_decoder.values()
              if token.special or (token.content in source and not token.content.isspace())}
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


def holds_control_token(value: Any, pattern: re.Pattern[str]) -> bool:
    """Whether any string in `value` (messages, tools, template variables: nested dicts and lists) has one."""
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, dict):
        return any(holds_control_token(key, pattern) or holds_control_token(item, pattern)
                   for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(holds_control_token(item, pattern) for item in value)
    return False


def mark(value: Any, pattern: re.Pattern[str]) -> Any:
    """`value` with every control-token string in its strings (dict keys too: tool-call arguments become dicts)
    wrapped in markers; markers a client sent are dropped first, so none can be forged."""
    if isinstance(value, str):
        clean = value.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda match: f"{MARK_START}{match.group(0)}{MARK_END}", clean)
    if isinstance(value, dict):
        return {mark(key, pattern): mark(item, pattern) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [mark(item, pattern) for item in value]
    return value


def encode_marked(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a prompt rendered from marked messages: marked strings as plain text, the rest as usual."""
    pieces = _MARKED.split(text)  # [text, marked, text, marked, ..., text]
    ids: list[int] = []
    added = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    for index, piece in enumerate(pieces):
        piece = piece.replace(MARK_START, "").replace(MARK_END, "")  # a lone marker (a template split it)
        if not piece:
            continue
        if index % 2 == 0:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        else:
            ids += _as_plain_text(tokenizer, piece, added)
    return [int(token) for token in ids]


def _as_plain_text(tokenizer: PreTrainedTokenizerBase, piece: str, added: set[int]) -> list[int]:
    """`piece` (one control-token string) in ordinary tokens. `split_special_tokens` splits only the special ones;
    an added token that is not special (e.g. `<tool_call>`) is spelled in two halves, which cannot match it."""
    plain = list(tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if added.intersection(plain):
        half = len(piece) // 2
        plain = [token for part in (piece[:half], piece[half:])
                 for token in tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    if added.intersection(plain):
        raise ValueError(f"the tokenizer cannot spell {piece!r} as plain text")
    return plain


def special_token_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids `add_special_tokens=True` puts before and after a text (e.g. BOS), found by encoding one letter."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(framed) - len(bare) + 1):
        if framed[start:start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare):]
    return [], []
