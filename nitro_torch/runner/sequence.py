"""What the runner needs to know of a sequence and of a step, declared here so the runner imports nothing from the
engine above it: the engine's Request and StepPlan satisfy these protocols structurally."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nitro_torch.sampling import SamplingParams


class SequenceState(Protocol):
    """One running sequence: its ids, its sampling parameters, its tokens so far and its KV blocks."""

    @property
    def request_id(self) -> str: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def block_ids(self) -> list[int]: ...

    @property
    def all_token_ids(self) -> list[int]: ...

    @property
    def num_tokens(self) -> int: ...

    def token_at(self, index: int) -> int: ...


class ScheduledChunk(Protocol):
    """`num_tokens` tokens of `request` from `start_position` computed in this step."""

    @property
    def request(self) -> SequenceState: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def start_position(self) -> int: ...

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so a new token is sampled."""
        ...


class StepInputs(Protocol):
    """A step as the scheduler planned it."""

    @property
    def scheduled(self) -> Sequence[ScheduledChunk]: ...

    @property
    def block_copies(self) -> list[tuple[int, int]]:
        """KV blocks to copy (source, destination) before the forward."""
        ...
