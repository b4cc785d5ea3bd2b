"""What the sampler and the grammar decoder read of a sequence: the runner's RequestState (persistent_batch.py)
and the engine's Request both have it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

import numpy as np

from nitro_torch.sampling import SamplingParams

TokenIds: TypeAlias = Sequence[int] | np.ndarray
"""A list of token ids, or a view of a row of the runner's token array."""


class SequenceState(Protocol):
    """One running sequence as sampling sees it: its id, its sampling parameters and its tokens so far."""

    @property
    def request_id(self) -> str: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def output_token_ids(self) -> TokenIds: ...

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def all_token_ids(self) -> TokenIds: ...
