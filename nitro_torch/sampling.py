"""Per-request sampling parameters, validated once and shared by the API layer and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


GuidedKind = Literal["json_object", "json_schema", "regex", "ebnf", "structural_tag"]


@dataclass(frozen=True)
class GuidedDecoding:
    """Constrain generation to a grammar (structured outputs): every sampled token keeps the output valid,
    and EOS / stop tokens are allowed only where the structure is complete (compiled by xgrammar, see
    runner/guided.py). `spec` per `kind`:

    - "json_object": ignored (""); any JSON object.
    - "json_schema": a JSON Schema as JSON text, e.g. '{"type": "object", "properties": {...}}'.
    - "regex": a regular expression the whole output must match (xgrammar's dialect, no anchors needed).
    - "ebnf": an EBNF/GBNF grammar whose start rule is named `root`, e.g. 'root ::= "yes" | "no"'.
    - "structural_tag": xgrammar's structural tag as JSON text, {"type": "structural_tag", "format": {...}}
      (e.g. a "triggered_tags" format: free text until a trigger, then a tag whose content follows a schema);
      the legacy {"structures": [{"begin", "schema", "end"}], "triggers": [...]} is accepted too.

    JSON (json_object, json_schema) is generated without free whitespace (', ' and ': ' separators), so even
    small models cannot wander into endless blank lines.
    """

    kind: GuidedKind
    spec: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of a sampled token, as the sampler reports it and the API turns into OpenAI's shape."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """The most likely alternatives at this position, best first (token id, logprob)."""


@dataclass
class SamplingParams:
    max_tokens: int | None = 16
    """Upper bound on generated tokens; None means "until the context window is full"."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    """None: no logprobs. N >= 0: the sampled token's logprob plus the N most likely alternatives."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before sampling (OpenAI: -100 bans, +100 forces)."""
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy_from(self) -> int | None:
        """Output tokens after which a plain argmax picks this request's token (no penalties, bias, logprobs or
        min_tokens masking), or None if it never does."""
        if not self.greedy or self.needs_penalties or self.logit_bias or self.logprobs is not None:
            return None
        return self.min_tokens

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self) -> None:
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", "must be -1 (disabled) or a positive integer")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be between 0 and 1")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        _check(self.min_tokens >= 0, "min_tokens", "must be non-negative")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            "must not exceed max_tokens",
        )
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids are non-negative")
        _check(all(t >= 0 for t in self.logit_bias), "logit_bias", "token ids are non-negative")
        _check(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias",
               "values must be between -100 and 100")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"must be between 0 and {MAX_TOP_LOGPROBS}",
        )


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(param, f"'{param}' {message}")
