"""What the scheduler tells the runner each step, as plain data (vLLM v1's SchedulerOutput).

The runner keeps its own state of every request it runs (request_state.py), so a step carries only what changed:
requests the runner has not seen (or sees again after a preemption) in full, the blocks the others gained, how
many tokens each computes, and which left. The runner never holds one of the scheduler's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nitro_torch.sampling import SamplingParams


@dataclass(slots=True)
class NewRequest:
    """A request the runner does not hold yet: new, a fork, or resumed after a preemption."""

    request_id: str
    token_ids: list[int]
    """Every known token: the prompt, and the outputs so far of a resumed request."""
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int
    """Tokens whose K/V are in the cache already (prefix hits, a fork's shared prompt)."""


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequest] = field(default_factory=list)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    """Request id -> blocks appended to a request the runner holds."""
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    """Request id -> tokens it computes in this step, from its computed count on, in batch order."""
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests the runner drops before this step: ended, aborted or preempted since the last one."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """KV blocks to copy (source, destination) before the forward."""

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())
