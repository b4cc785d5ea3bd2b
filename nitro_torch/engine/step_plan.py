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

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def load(self) -> StepLoad:
        load = StepLoad()
        for item in self.scheduled:
            load.add(item.start_position, item.num_tokens)
        return load

    def loads_per_client(self) -> dict[str, StepLoad]:
        loads: dict[str, StepLoad] = {}
        for item in self.scheduled:
            client = item.request.client
            load = loads.get(client)
            if load is None:
                load = loads[client] = StepLoad()
            load.add(item.start_position, item.num_tokens)
        return loads

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
