"""The LM head of a tied-embedding model on packed CPU weights: packed for a few rows, the embedding's float32 weight
for a batch.

torch's packed CPU matmuls decode the weights again for every few rows, so past a handful of rows they are bound by
compute: SmolLM2's 49,152 x 576 head (GGUF Q8_0, two 4-bit parts) costs about 1 ms a row on 2 cores, 32 ms for a
32-row decode step. A float32 matmul reads its weight once for the whole batch and is bound by memory bandwidth:
about 11 ms for that head at any batch up to ~32 rows. A tied model keeps that float32 weight anyway, for its
embedding lookup, so the batched head costs no memory: at 32 rows the whole decode step took 0.90x the time.
Below `FLOAT_MIN_ROWS` the packed head is faster (one row: 2.4 against 5.5 ms) and stays.

The two paths differ by the packed one's bfloat16 rounding of its input (logits within ~0.1 of ~20), so with packed
weights a request's greedy tokens can depend on how many rows share its step, as they already depend on the
weights' format.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

FLOAT_MIN_ROWS = 16
"""Where the float32 head overtook the packed one on a 2-core AVX-512 machine was 10-12 rows; 16 keeps a margin
for machines with more cores per memory channel, where the packed path's compute costs less."""
_LINEAR_MIN_ROWS = 64
"""torch's float32 CPU linear (x @ W^T) was 2x slower than the same product made as W @ x^T below 64 rows, and as
fast from 64 on."""
_BLOCK_ROWS = 4096
"""Weight rows per block of the blockwise product: each block's [rows, batch] result is transposed while in cache
(transposing a whole [vocab, batch] result cost more than the product saved)."""


class TiedPackedHead(nn.Module):
    def __init__(self, packed: nn.Module, embedding: nn.Embedding, min_rows: int = FLOAT_MIN_ROWS) -> None:
        super().__init__()
        self.packed = packed
        self.min_rows = min_rows
        """Fewer rows run packed (a benchmark sets it out of reach for its baseline)."""
        self.float_weight: torch.Tensor = embedding.weight.detach()
        """The embedding's own storage (not a parameter of this module: the embedding owns it)."""

    @property
    def out_features(self) -> int:
        return int(self.float_weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows < self.min_rows:
            return self.packed(x)
        if rows >= _LINEAR_MIN_ROWS:
            logits = functional.linear(flat, self.float_weight)
        else:
            logits = _linear_by_blocks(flat, self.float_weight)
        return logits.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"float32 from {self.min_rows} rows"


def tied_packed_head(model: nn.Module, tied_embedding: nn.Embedding | None) -> TiedPackedHead | None:
    """The head to put in place of `model.lm_head` once it is packed, when it was tied to `tied_embedding` and
    that weight is float32; None otherwise."""
    head = getattr(model, "lm_head", None)
    if tied_embedding is None or head is None or isinstance(head, (nn.Linear, TiedPackedHead)):
        return None
    weight = tied_embedding.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    if getattr(head, "bias", None) is not None or getattr(head, "out_features", None) != weight.shape[0]:
        return None
    return TiedPackedHead(head, tied_embedding)


def tied_embedding_of(model: nn.Module) -> nn.Embedding | None:
    """The input embedding whose weight the float LM head shares, if it does."""
    head, get_embeddings = getattr(model, "lm_head", None), getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(head, nn.Linear) or not isinstance(embedding, nn.Embedding):
        return None
    return embedding if head.weight is embedding.weight else None


def _linear_by_blocks(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, one block of weight rows at a time, each made as block @ x^T."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    x_t = x.T
    for start in range(0, weight.shape[0], _BLOCK_ROWS):
        block = weight[start:start + _BLOCK_ROWS]
        out[:, start:start + block.shape[0]] = torch.mm(block, x_t).T
    return out
