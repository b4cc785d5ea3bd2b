"""One engine step as the scheduler planned it: which requests compute how many tokens from where. No tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from nitro_torch.engine.request import Request
from nitro_torch.engine.step_time import StepLoad
from nitro_torch.runner.scheduler_output import SchedulerOutput


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int
    start_position: int
    samples: bool = False
    """The chunk reaches the request's last token (pending ones included), so a new token is sampled."""

    def __post_init__(self) -> None:
        self.samples = self.start_position + self.num_tokens == self.request.num_tokens_with_pending


@dataclass
class StepPlan:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """KV blocks to copy (source, destination) before the forward."""
    for_runner: SchedulerOutput = field(default_factory=SchedulerOutput)
    """The step as the runner gets it: data only."""
    only_client: str | None = None
    """The one client that had requests when the step was planned (None: several), so its loads need no grouping."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def load(self) -> StepLoad:
        return load_of(self.scheduled)

    def loads_per_client(self) -> dict[str, StepLoad]:
        if self.only_client is not None:
            return {self.only_client: self.load()}
        per_client: dict[str, list[ScheduledRequest]] = {}
        for item in self.scheduled:
            per_client.setdefault(item.request.client, []).append(item)
        return {client: load_of(items) for client, items in per_client.items()}

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def load_of(items: list[ScheduledRequest]) -> StepLoad:
    """What `items` compute together, summed in a few passes (this runs after every step, over every request)."""
    counts = [item.num_tokens for item in items]
    starts = [item.start_position for item in items]
    num_tokens = sum(counts)
    kv_tokens = sum(starts) + num_tokens
    if num_tokens == len(items):  # decodes only: each reads its context once
        return StepLoad(num_tokens, kv_tokens, kv_tokens, False)
    pairs = sum(n * start + n * (n + 1) // 2 for n, start in zip(counts, starts))
    return StepLoad(num_tokens, kv_tokens, pairs, True)
