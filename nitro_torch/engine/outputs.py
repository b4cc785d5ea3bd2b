"""What the engine hands back per request per step: a delta, never the whole text again."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from nitro_torch.sampling import TokenLogprob

__all__ = ["FinishReason", "RequestOutput", "TokenLogprob"]


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class RequestOutput:
    request_id: str
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    """One entry per token of `new_token_ids` when the request asked for logprobs."""
    error: str | None = None
    """Set on the final output of a request that failed alone (its sampling or output processing)."""
    stop_string: str | None = None
    """On the final output of a request that a stop string ended: which one (Anthropic's `stop_sequence`)."""
    # timings (time.monotonic), set on the finished output only
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
