"""Engine token logprobs -> OpenAI's logprobs objects (token text and UTF-8 bytes)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from nitro_torch.engine.outputs import TokenLogprob
from nitro_torch.server.chat.protocol import ChoiceLogprobs, TokenLogprobEntry, TopLogprob


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE tokens spell each byte as one character (GPT-2's table); this maps them back."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTexts:
    """Caches each token id's (text, bytes) for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = _is_byte_level(tokenizer)

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            decoder = _byte_level_decoder()
            if isinstance(piece, str) and all(char in decoder for char in piece):
                raw = bytes(decoder[char] for char in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        # transformers types decode as str | list[str]; a flat id list always decodes to one str.
        text: str = self.tokenizer.decode([token_id], skip_special_tokens=False)  # type: ignore[assignment]
        return text, list(text.encode("utf-8"))


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel" or "ByteLevel" in repr(decoder)


def to_openai_logprobs(entries: Sequence[TokenLogprob], token_texts: TokenTexts) -> ChoiceLogprobs:
    content = []
    for entry in entries:
        text, raw = token_texts(entry.token_id)
        top = []
        for alt_id, alt_logprob in entry.top:
            alt_text, alt_raw = token_texts(alt_id)
            top.append(TopLogprob(token=alt_text, logprob=_finite(alt_logprob), bytes=alt_raw))
        content.append(TokenLogprobEntry(token=text, logprob=_finite(entry.logprob), bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


def _finite(logprob: float) -> float:
    # JSON has no -inf or NaN; OpenAI reports impossible tokens as -9999.0.
    value = float(logprob)
    return value if math.isfinite(value) and value > -9999.0 else -9999.0
