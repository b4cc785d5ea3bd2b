"""Incremental detokenization: stream text token by token without splitting characters or stop strings."""

from __future__ import annotations

from nitro_torch.sampling import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
"""What an incomplete UTF-8 sequence (byte-fallback / byte-level tokens) decodes to."""

PROMPT_CONTEXT_TOKENS = 4
"""Prompt tokens decoded ahead of the output (vLLM's initial prefix offset): enough for the decoder to see
that the first generated token is not at the start of the text."""


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas.

    Each step decodes only a short window of recent tokens (prefix-offset / read-offset): the
    text of tokens[prefix:read] was already emitted, so the new text is what tokens[prefix:]
    adds to it. Keeping one already-emitted token in the window preserves leading-space and
    byte-merge context. The window starts with the last few prompt tokens (never emitted), so
    decoders that strip the text's first space (sentencepiece / Llama) keep the space of a
    completion that continues a prompt; the emitted pieces concatenate to
    ``decode(context + output_ids)[len(decode(context)):]``.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._backend_decode = _backend_decode(tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._unrendered_ids = _unrendered_token_ids(tokenizer, params)
        self._stop_strings = list(params.stop)
        self._include_stop_string = params.include_stop_str_in_output
        self._token_ids: list[int] = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._pending_chars = 0
        """Chars past tokens[prefix:read]'s text already taken while the window ended mid-character."""
        self._held_text = ""
        """Decoded text not yet emitted because it could be the start of a stop string."""
        self._output_text = ""
        self._stop_string: str | None = None
        self._stopped = False
        self._finished = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text, once it did."""
        return self._stop_string

    @property
    def output_text(self) -> str:
        return self._output_text

    def add(self, token_id: int) -> str:
        if self._stopped or self._finished:
            raise RuntimeError("add() after the detokenizer stopped or finished")
        if token_id in self._unrendered_ids:
            return ""
        self._token_ids.append(token_id)
        return self._emit(self._decode_new_text(final=False), final=False)

    def finish(self) -> str:
        """The request ended for another reason: release held-back text, incomplete characters included."""
        if self._stopped or self._finished:
            return ""
        self._finished = True
        return self._emit(self._decode_new_text(final=True), final=True)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last rendered prompt tokens, minus a trailing incomplete character (its text could not be
        told apart from the output's)."""
        context = [t for t in prompt_token_ids[-2 * PROMPT_CONTEXT_TOKENS:] if t not in self._unrendered_ids]
        context = context[-PROMPT_CONTEXT_TOKENS:]
        while context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context.pop()
        return context

    def _decode_new_text(self, final: bool) -> str:
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._token_ids[self._prefix_offset :])
        complete = final or not window_text.endswith(_REPLACEMENT_CHAR)
        stable_text = window_text if complete else window_text.rstrip(_REPLACEMENT_CHAR)
        new_text = stable_text[len(prefix_text) + self._pending_chars :]
        if complete:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
            self._pending_chars = 0
        else:
            self._pending_chars += len(new_text)
        return new_text

    def _emit(self, new_text: str, final: bool) -> str:
        if not self._stop_strings:
            self._output_text += new_text
            return new_text
        text = self._held_text + new_text
        stop_at = _earliest_stop(text, self._stop_strings)
        if stop_at is not None:
            start, end = stop_at
            emitted = text[: end if self._include_stop_string else start]
            self._stop_string = text[start:end]
            self._stopped = True
            self._held_text = ""
        else:
            held = 0 if final else _stop_prefix_length(text, self._stop_strings)
            emitted = text[: len(text) - held]
            self._held_text = text[len(text) - held :]
        self._output_text += emitted
        return emitted

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._backend_decode is not None:
            return self._backend_decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        # Window-dependent space clean-up would make the deltas disagree with one full decode.
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


def _backend_decode(tokenizer):
    """The fast tokenizer's own (Rust) decode: what `tokenizer.decode(ids, clean_up_tokenization_spaces=False)`
    calls after validating its input in Python, which cost more than the decode itself (tens of microseconds a
    token). None for a tokenizer without one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    decode = getattr(backend, "decode", None)
    return decode if callable(decode) and type(backend).__module__.startswith("tokenizers") else None


def _unrendered_token_ids(tokenizer, params: SamplingParams) -> frozenset[int]:
    """Tokens kept out of the window entirely: leaving a skipped special token inside it would make
    the decoder treat the following token as the first one (and e.g. drop its leading space)."""
    if not params.skip_special_tokens:
        return frozenset()
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(special | set(tokenizer.all_special_ids) | set(params.stop_token_ids))


def _earliest_stop(text: str, stop_strings: list[str]) -> tuple[int, int] | None:
    """(start, end) of the stop string occurrence that completes first, as it would when streaming."""
    best: tuple[int, int] | None = None
    for stop in stop_strings:
        start = text.find(stop)
        if start >= 0:
            candidate = (start, start + len(stop))
            if best is None or (candidate[1], candidate[0]) < (best[1], best[0]):
                best = candidate
    return best


def _stop_prefix_length(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = max(len(stop) for stop in stop_strings) - 1
    for start in range(max(0, len(text) - longest), len(text)):
        tail = text[start:]
        if any(stop.startswith(tail) for stop in stop_strings):
            return len(tail)
    return 0
