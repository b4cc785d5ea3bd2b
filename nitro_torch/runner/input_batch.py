"""The integer arrays one packed forward needs (host side; persistent_batch.py gathers them). No tensors here.

Decodes (one token) come first, then the prefill chunks, so the attention sees one contiguous decode block
[0, num_decodes) and the chunks after it. Block tables are padded with block 0 to the widest row; the kernels
never read past a row's context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nitro_torch.runner.sequence import SequenceState

Ints = np.ndarray
"""A 1-D (or, for block tables, 2-D) int64 array."""


def _empty() -> Ints:
    return np.zeros(0, dtype=np.int64)


PADDING_SLOT = -1
"""Slot of a padding token (CUDA-graph batches): the KV store skips it."""


@dataclass
class HostBatch:
    token_ids: Ints = field(default_factory=_empty)
    positions: Ints = field(default_factory=_empty)
    slots: Ints = field(default_factory=_empty)
    logits_rows: list[int] = field(default_factory=list)
    """Packed row of each sampling request's last token, in `sampling` order."""
    sampling: list[SequenceState] = field(default_factory=list)
    num_decodes: int = 0
    decode_tables: Ints = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    decode_context_lens: Ints = field(default_factory=_empty)
    decode_first_block: int | None = None
    """With one decode row: its first block when all its blocks follow each other (None otherwise)."""
    prefill_query_starts: list[int] = field(default_factory=list)
    """Row of each chunk's first token in the packed batch (after the decodes)."""
    prefill_query_lens: list[int] = field(default_factory=list)
    prefill_context_lens: list[int] = field(default_factory=list)
    """Tokens of the request in the cache after this step: cached prefix + this chunk."""
    prefill_tables: Ints = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    pending_rows: list[int] = field(default_factory=list)
    """Rows whose token was sampled in the step still in flight (asynchronous scheduling): it is copied in on the
    device from that step's sampled ids, by request id (`pending_ids`)."""
    pending_ids: list[str] = field(default_factory=list)
    all_plain_greedy: bool | None = None
    """Every sampling row picks its token by a plain argmax (None: not known; the sampler asks each row)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_pure_decode(self) -> bool:
        return self.num_decodes > 0 and not self.prefill_query_lens

    @property
    def prefill_cu_query_lens(self) -> list[int]:
        """[0, len0, len0+len1, ...] relative to the first prefill row."""
        cumulative = [0]
        for length in self.prefill_query_lens:
            cumulative.append(cumulative[-1] + length)
        return cumulative
