"""Decode steps replayed as CUDA graphs, one per padded batch size, all in one memory pool.

A pure-decode step (every scheduled request adds one token) has the same kernels for any batch of the same
size, so it is captured once per size in `capture_sizes` and replayed: the launch overhead of a few hundred
kernels becomes one. A batch of n requests runs in the graph of the smallest captured size >= n; the rows
after n are padding: token 0 at position 0, KV slot -1 (not stored), context length 0 (attends nothing). Their
logits are dropped. Captured graphs read static input buffers, so a replay first copies the step's inputs
into them (device to device). Steps with prefill chunks, or larger than the largest graph, run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nitro_torch.runner.attention import AttentionMetadata, step_context
from nitro_torch.runner.input_batch import PADDING_SLOT
from nitro_torch.runner.kv_cache import KVCache

logger = logging.getLogger("nitro_torch.runner")

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids [1, B], position_ids [1, B]) -> logits [B, V] of every row, run inside a step context."""


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... below max_num_seqs, and max_num_seqs itself."""
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    sizes.append(max_num_seqs)
    return sizes


def padded_size(num_rows: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding num_rows, or None when the batch is larger than every graph."""
    return next((size for size in sizes if size >= num_rows), None)


@dataclass
class DecodeInputs:
    """One pure-decode step on the device: n rows each."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    """[n, w], w <= the buffers' max_blocks_per_seq."""
    context_lens: torch.Tensor


class DecodeBuffers:
    """The static tensors captured graphs read; `fill` writes a step (and its padding) into them in place."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.input_ids = longs(max_batch)
        self.positions = longs(max_batch)
        self.slot_mapping = torch.full((max_batch,), PADDING_SLOT, dtype=torch.long, device=device)
        self.block_tables = longs(max_batch, max_blocks_per_seq)
        self.context_lens = longs(max_batch)
        self._metadata: dict[int, AttentionMetadata] = {}

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def fill(self, inputs: DecodeInputs, size: int) -> None:
        n, width = inputs.block_tables.shape
        if n > size or width > self.max_blocks_per_seq:
            raise ValueError(f"a decode batch of {n} rows x {width} blocks does not fit buffers of size {size}")
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(inputs.slot_mapping)
        self.context_lens[:n].copy_(inputs.context_lens)
        self.block_tables[:n, :width].copy_(inputs.block_tables)
        # Blocks after `width` keep stale ids of earlier steps: valid ids, never read below a row's context length.
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(PADDING_SLOT)
        self.context_lens[n:size].zero_()

    def metadata(self, kv_cache: KVCache, size: int) -> AttentionMetadata:
        """The same object for every step of a size: a compiled forward guards on it, so it must not change."""
        metadata = self._metadata.get(size)
        if metadata is None:
            metadata = self._metadata[size] = AttentionMetadata(
                kv_cache=kv_cache,
                slot_mapping=self.slot_mapping[:size],
                num_decode_tokens=size,
                decode_block_tables=self.block_tables[:size],
                decode_context_lens=self.context_lens[:size],
            )
        return metadata


class DecodeGraphs:
    """Captures and replays decode graphs. With `capture=False` it runs the same padded static-buffer steps
    eagerly, which is how the padding and buffer bookkeeping are tested without a GPU."""

    def __init__(self, forward: Forward, kv_cache: KVCache, max_num_seqs: int, max_blocks_per_seq: int,
                 device: torch.device, capture: bool = True) -> None:
        self.forward = forward
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_num_seqs)
        self.buffers = DecodeBuffers(self.sizes[-1], max_blocks_per_seq, device)
        self.device = device
        self._capture = capture
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def can_run(self, num_rows: int, table_width: int) -> bool:
        return padded_size(num_rows, self.sizes) is not None and table_width <= self.buffers.max_blocks_per_seq

    def warm_all(self) -> None:
        """Run every size once (all rows padding: nothing is stored or read), so a compiled forward compiles here
        rather than in a user's request."""
        for size in reversed(self.sizes):
            self.buffers.fill(DecodeInputs(*(self.buffers.input_ids[:0],) * 3, self.buffers.block_tables[:0],
                                           self.buffers.context_lens[:0]), size)
            self._run_eager(size)

    def capture_all(self) -> None:
        """Capture every size, largest first so the smaller graphs reuse its pool memory."""
        if not self._capture:
            return
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._run_eager(size)  # warm-up outside capture: lazy inits, Triton autotune/compile
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._run_eager(size)
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Logits [n, V] of the n decode rows (a view of the graph's static output: read it before the next run)."""
        n = inputs.input_ids.shape[0]
        size = padded_size(n, self.sizes)
        if size is None:
            raise ValueError(f"no decode graph holds {n} rows (largest: {self.sizes[-1]})")
        self.buffers.fill(inputs, size)
        if size in self._graphs:
            graph, logits = self._graphs[size]
            graph.replay()
        else:
            logits = self._run_eager(size)
        return logits[:n]

    def _run_eager(self, size: int) -> torch.Tensor:
        b = self.buffers
        with step_context(b.metadata(self.kv_cache, size)):
            return self.forward(b.input_ids[None, :size], b.positions[None, :size])
