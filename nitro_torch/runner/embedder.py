"""Embeddings from the loaded causal LM: the base model's last hidden states (after the final norm), mean-pooled
over each input's tokens and L2-normalised.

Several inputs run packed as one [1, T] sequence through the same paged attention as generation, in its
cache-free mode: every input is a prefill chunk attending causally to its own fresh K/V, and nothing is written
to the KV cache, so embeddings neither take blocks from running requests nor touch their cached prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from nitro_torch.runner.attention import AttentionMetadata, PrefillChunk, step_context
from nitro_torch.runner.kv_cache import KVCache


def pack_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive item indices per forward, at most `max_tokens` tokens each; a longer item runs alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        batches.append(current)
    return batches


class Embedder:
    def __init__(self, model: PreTrainedModel, kv_cache: KVCache, device: torch.device,
                 max_batch_tokens: int) -> None:
        self.base = model.base_model  # the decoder stack with its final norm, without the LM head
        self.kv_cache = kv_cache
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.dim: int = config.hidden_size

    def embed(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, dim] float32 unit vectors, one per input, computed in forwards of at most max_batch_tokens
        tokens (an input longer than that gets a forward of its own)."""
        if any(len(ids) == 0 for ids in token_id_lists):
            raise ValueError("an embedding input needs at least one token")
        out = torch.empty(len(token_id_lists), self.dim, dtype=torch.float32)
        for batch in pack_batches([len(ids) for ids in token_id_lists], self.max_batch_tokens):
            out[batch] = self.forward([token_id_lists[i] for i in batch]).cpu()
        return out

    @torch.inference_mode()
    def forward(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """One packed forward over all inputs: [N, dim] float32 unit vectors on the model's device."""
        lengths = [len(ids) for ids in token_id_lists]
        input_ids = torch.tensor([t for ids in token_id_lists for t in ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        chunks, start = [], 0
        no_blocks = torch.empty(0, dtype=torch.long, device=self.device)
        for n in lengths:
            chunks.append(PrefillChunk(query_start=start, query_len=n, context_len=n, block_table=no_blocks))
            start += n
        metadata = AttentionMetadata(kv_cache=self.kv_cache, slot_mapping=no_blocks, prefills=chunks,
                                     write_kv=False)
        with step_context(metadata):
            hidden = self.base(input_ids=input_ids[None], position_ids=positions[None],
                               use_cache=False).last_hidden_state[0]
        segments = torch.repeat_interleave(torch.arange(len(lengths), device=self.device),
                                           torch.tensor(lengths, device=self.device))
        sums = torch.zeros(len(lengths), hidden.shape[-1], dtype=torch.float32, device=self.device)
        sums.index_add_(0, segments, hidden.float())
        means = sums / torch.tensor(lengths, dtype=torch.float32, device=self.device)[:, None]
        return F.normalize(means, p=2, dim=-1)
