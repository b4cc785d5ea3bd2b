"""Request state as the scheduler sees it: token ids and counters, no tensors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from nitro_torch.engine.outputs import FinishReason
from nitro_torch.sampling import SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_total_tokens: int = 0
    """Prompt + output length at which the request ends with `length` (context window or max_tokens)."""
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    """When the scheduler first admitted the request (time.monotonic); queue time = this - arrival_time."""
    first_token_time: float | None = None
    last_token_time: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache (prefix hits included)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the last admission."""
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    parent: Request | None = None
    """Another request with the same prompt (choice 0 of n) whose computed prompt this one shares."""
    num_pending_tokens: int = 0
    """Tokens sampled on the device in a step still in flight (asynchronous scheduling): known to come, not yet
    known. The next step computes them all the same."""
    num_blocks_in_runner: int | None = None
    """How many of its blocks the runner knows; None while the runner does not hold the request."""
    client: str = ""
    """Who sent it (API key or address, as the server tells): the scheduler shares steps fairly between clients."""
    last_served: int = -1
    """The scheduler's count of requests served when this one last ran: requests take turns, lowest first."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        if self.max_total_tokens <= 0:
            self.max_total_tokens = len(self.prompt_token_ids) + (self.params.max_tokens or 1)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def stop_reason(self, token: int) -> FinishReason | None:
        """Whether `token`, just appended, ends the request by a token-level rule (EOS, stop token ids, its length);
        stop strings are the client's (they need text)."""
        params = self.params
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                return FinishReason.STOP
        if self.num_tokens >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]
