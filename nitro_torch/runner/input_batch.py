"""A step (SchedulerOutput + the runner's request states) flattened into the integer lists one packed forward
needs. Plain Python: no tensors here.

Decodes (one token) come first, then the prefill chunks, so the attention sees one contiguous decode block
[0, num_decodes) and the chunks after it. Block tables are padded with block 0 to the widest row; the kernels
never read past a row's context length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nitro_torch.runner.scheduler_output import SchedulerOutput
from nitro_torch.runner.sequence import RequestState

PADDING_SLOT = -1
"""Slot of a padding token (CUDA-graph batches): the KV store skips it."""


@dataclass
class HostBatch:
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    """Packed row of each sampling request's last token, in `sampling` order."""
    sampling: list[RequestState] = field(default_factory=list)
    num_decodes: int = 0
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_context_lens: list[int] = field(default_factory=list)
    prefill_query_starts: list[int] = field(default_factory=list)
    """Row of each chunk's first token in the packed batch (after the decodes)."""
    prefill_query_lens: list[int] = field(default_factory=list)
    prefill_context_lens: list[int] = field(default_factory=list)
    """Tokens of the request in the cache after this step: cached prefix + this chunk."""
    prefill_tables: list[list[int]] = field(default_factory=list)

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


def build_host_batch(step: SchedulerOutput, states: Mapping[str, RequestState], block_size: int) -> HostBatch:
    """Each scheduled request computes `count` tokens from its computed count on; it samples when they reach its
    last known token."""
    batch = HostBatch()
    prefills: list[tuple[RequestState, int]] = []
    token_ids, positions, slots, tables, context_lens = (batch.token_ids, batch.positions, batch.slots,
                                                         batch.decode_tables, batch.decode_context_lens)
    for request_id, count in step.num_scheduled_tokens.items():
        state = states[request_id]
        if count != 1:
            prefills.append((state, count))
            continue
        pos, blocks = state.num_computed_tokens, state.block_ids
        token_ids.append(state.token_ids[pos])
        positions.append(pos)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        tables.append(blocks)
        context_lens.append(pos + 1)
        if pos + 1 == len(state.token_ids):
            batch.logits_rows.append(len(token_ids) - 1)
            batch.sampling.append(state)
    batch.num_decodes = len(token_ids)
    for state, count in prefills:
        _add_prefill(batch, state, count, block_size)
        if state.num_computed_tokens + count == len(state.token_ids):
            batch.logits_rows.append(len(batch.token_ids) - 1)
            batch.sampling.append(state)
    batch.decode_tables = pad_rows(batch.decode_tables)
    batch.prefill_tables = pad_rows(batch.prefill_tables)
    return batch


def _add_prefill(batch: HostBatch, state: RequestState, count: int, block_size: int) -> None:
    start, blocks = state.num_computed_tokens, state.block_ids
    batch.prefill_query_starts.append(len(batch.token_ids))
    batch.prefill_query_lens.append(count)
    batch.prefill_context_lens.append(start + count)
    batch.prefill_tables.append(blocks[: -(-(start + count) // block_size)])
    batch.token_ids.extend(state.token_ids[start:start + count])
    for pos in range(start, start + count):
        batch.positions.append(pos)
        batch.slots.append(slot_of(blocks, pos, block_size))


def slot_of(block_ids: list[int], position: int, block_size: int) -> int:
    return block_ids[position // block_size] * block_size + position % block_size


def pad_rows(rows: list[list[int]], width: int | None = None) -> list[list[int]]:
    """Rows padded with block 0 to `width` (default: the longest row)."""
    if width is None:
        width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]
