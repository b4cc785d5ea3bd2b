"""Request fields every generating endpoint shares (OpenAI's plus vLLM's extras) and their SamplingParams.

ChatCompletionRequest (protocol.py) and CompletionRequest (openai/completions.py) build on SamplingFields.
"""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, field_validator

from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.http.schema import LenientModel

SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_N = 64


class StreamOptions(LenientModel):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False
    """vLLM's option: every chunk carries the usage so far."""


class SamplingFields(LenientModel):
    model: str | None = ""
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
    ignore_eos: StrictBool | None = False
    min_tokens: int | None = 0
    include_stop_str_in_output: StrictBool | None = False
    skip_special_tokens: StrictBool | None = True
    stream: StrictBool | None = False
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
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def check_common(self) -> None:
        if not 1 <= self.num_choices <= MAX_N:
            raise SamplingParamsError("n", f"'n' must be between 1 and {MAX_N}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise SamplingParamsError("seed", "'seed' must fit in 64 bits")

    def token_biases(self) -> dict[int, float]:
        """OpenAI sends token ids as JSON object keys, i.e. strings."""
        biases: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                biases[int(key)] = float(bias)
            except ValueError:
                raise SamplingParamsError("logit_bias", f"'logit_bias' keys must be token ids, not {key!r}") from None
        return biases

    def sampling_params(self, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        """Validated parameters (SamplingParamsError names the bad field); `max_tokens` None = the rest of the
        context window."""
        self.check_common()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
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
            logprobs=logprobs,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=_or(self.skip_special_tokens, True),
            logit_bias=self.token_biases(),
        )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
