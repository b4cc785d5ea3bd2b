"""The runner's own state of a running request, and the protocol the sampler and the grammar decoder read.

The runner builds a `RequestState` from a `NewRequest`, appends the blocks the scheduler reports and the tokens it
samples itself, so nothing but plain data crosses from the scheduler (scheduler_output.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput
from nitro_torch.sampling import SamplingParams


class SequenceState(Protocol):
    """One running sequence as sampling sees it: its id, its sampling parameters and its tokens so far."""

    @property
    def request_id(self) -> str: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def all_token_ids(self) -> list[int]: ...


@dataclass(slots=True, eq=False)
class RequestState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int

    @classmethod
    def of(cls, new: NewRequest) -> RequestState:
        return cls(new.request_id, list(new.token_ids), new.num_prompt_tokens, new.params, new.eos_token_ids,
                   list(new.block_ids), new.num_computed_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class RequestStates(dict[str, RequestState]):
    """The runner's requests by id, kept in step with the scheduler by `apply` (before a step's forward) and
    `record` (after it)."""

    def apply(self, step: SchedulerOutput) -> None:
        """Requests that left are dropped, new ones taken in, grown ones get their blocks."""
        for request_id in step.finished_request_ids:
            self.pop(request_id, None)
        for new in step.new_requests:
            self[new.request_id] = RequestState.of(new)
        for request_id, block_ids in step.new_block_ids.items():
            self[request_id].block_ids.extend(block_ids)

    def record(self, step: SchedulerOutput, sampled: Mapping[str, int]) -> None:
        """After the forward: computed counts advance; each sampled token joins its request."""
        for request_id, count in step.num_scheduled_tokens.items():
            self[request_id].num_computed_tokens += count
        for request_id, token_id in sampled.items():
            self[request_id].token_ids.append(token_id)
