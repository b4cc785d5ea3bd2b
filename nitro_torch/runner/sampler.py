"""Batched next-token sampling on the device with a single device->host transfer per step.

Order per row (vLLM/OpenAI semantics): penalties, min_tokens masking, the grammar mask (structured
outputs), then either argmax (greedy) or temperature, top-k, top-p, min-p and a draw. Logprobs always
describe the raw model logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from nitro_torch.runner.sequence import SequenceState, TokenIds
from nitro_torch.sampling import TokenLogprob

if TYPE_CHECKING:
    from nitro_torch.runner.guided import TokenMask

INVALID_TOKEN = -1
"""The token of a row whose logits are broken (a NaN, +inf, or no finite value; -inf entries are fine, some
models mask tokens so): the engine fails that request alone."""

_TOP_P_DISABLED = 2.0
"""Above any cumulative probability, so float rounding in cumsum can never filter a token."""


class SampledToken(NamedTuple):
    """A tuple, not a dataclass: a step builds one per row, and a frozen dataclass costs ~1 us to construct."""

    token_id: int
    logprob: TokenLogprob | None
    """None unless the request asked for logprobs."""


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self._device = torch.device(device)
        self._shared_generator = torch.Generator(device=self._device)
        self._shared_generator.seed()
        self._seeded_generators: dict[str, torch.Generator] = {}
        self._columns: SamplingColumns | None = None

    def release(self, request_id: str) -> None:
        self._seeded_generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: Sequence[SequenceState], grammar: TokenMask | None = None,
               all_plain_greedy: bool | None = None) -> list[SampledToken]:
        """`grammar`: the allowed tokens of the rows that decode under a grammar (None: no such row).
        `all_plain_greedy`: whether every row is a plain argmax, when the caller knows (None: ask each row)."""
        if len(requests) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {len(requests)} requests")
        if all_plain_greedy is None:
            all_plain_greedy = all(_is_plain_greedy(r) for r in requests)
        if all_plain_greedy:
            if grammar is None and _host_pick_is_faster(logits):
                return [SampledToken(t, None) for t in host_greedy_ids(logits)]
            row_max, token_ids = greedy_pick(logits)
            if grammar is not None:
                token_ids = grammar.greedy(logits, token_ids)
            if logits.device.type == "cpu":  # no transfer to save: flag broken rows here, without two more ops
                return [SampledToken(t if math.isfinite(m) else INVALID_TOKEN, None)
                        for t, m in zip(token_ids.tolist(), row_max.tolist())]
            finite = torch.isfinite(row_max)  # False for NaN (max propagates it), +inf, or all -inf
            return [SampledToken(t, None) for t in _flag_invalid(token_ids, finite).tolist()]

        finite = torch.isfinite(logits.amax(dim=-1))
        scores = logits.to(torch.float32, copy=True)
        apply_penalties(scores, requests)
        apply_logit_bias(scores, requests)
        mask_stops_before_min_tokens(scores, requests)
        if grammar is not None:
            grammar.apply(scores)
        token_ids = scores.argmax(dim=-1)
        if not all(r.params.greedy for r in requests):
            columns = self._columns_for(requests, scores.shape[1], scores.device)
            drawn = self._draw(filter_for_sampling(scores, requests, columns), requests)
            token_ids = torch.where(columns.is_greedy, token_ids, drawn)

        top_n = max((r.params.logprobs for r in requests if r.params.logprobs is not None), default=None)
        if top_n is None:
            return [SampledToken(t, None) for t in _flag_invalid(token_ids, finite).tolist()]
        return _with_logprobs(logits, token_ids, requests, top_n, finite)

    def greedy_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax of each row as a tensor on the logits' device (INVALID_TOKEN for a broken row), without a
        host sync: for rows that are all plain greedy, when the step's tokens may stay on the device a while."""
        row_max, token_ids = greedy_pick(logits)
        return _flag_invalid(token_ids, torch.isfinite(row_max))

    def _draw(self, scores: torch.Tensor, requests: Sequence[SequenceState]) -> torch.Tensor:
        """Exponential-race sampling: argmax(p / q), q ~ Exp(1), draws each row from p.

        A seeded row gets its noise only from its own generator, so its tokens do not depend on
        which other requests share the batch.
        """
        probs = scores.softmax(dim=-1)
        noise = torch.empty_like(probs)
        if any(r.params.seed is None for r in requests):
            noise.exponential_(generator=self._shared_generator)
        for row, request in enumerate(requests):
            if request.params.seed is not None:
                noise[row].exponential_(generator=self._generator_for(request))
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)

    def _columns_for(self, requests: Sequence[SequenceState], vocab_size: int,
                     device: torch.device) -> SamplingColumns:
        """The last batch's columns while the batch is the same requests in the same order."""
        columns = self._columns
        if (columns is None or len(columns.request_ids) != len(requests) or columns.top_k.device != device
                or any(known != r.request_id for known, r in zip(columns.request_ids, requests))):
            columns = self._columns = SamplingColumns.of(requests, vocab_size, device)
        return columns

    def _generator_for(self, request: SequenceState) -> torch.Generator:
        generator = self._seeded_generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self._device)
            generator.manual_seed(request.params.seed or 0)  # only seeded requests get here
            self._seeded_generators[request.request_id] = generator
        return generator


_CPU_BLOCKS = (1024, 512, 256, 128)
_HOST_PICK_MAX_ROWS_TIMES_THREADS = 32
"""numpy's argmax runs on one thread with no dispatch cost; torch's blocked pick below is a few ops on every thread.
On the 2-core CPU (vocabulary 49,152) numpy took 7 us for 1 row against 48, and 111 against 151 for 16 rows of
logits in cache; on logits fresh from a step's LM head torch was already as fast at 64 rows."""


def _host_pick_is_faster(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(-1) == 1
            and not logits.requires_grad
            and logits.shape[0] * torch.get_num_threads() <= _HOST_PICK_MAX_ROWS_TIMES_THREADS)


def host_greedy_ids(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first maximum) from float32 CPU logits, through numpy; INVALID_TOKEN for a broken row
    (numpy's argmax stops at a NaN, which is then the row's value; +inf is a maximum; an all -inf row gives -inf).
    Few numpy calls: right after a forward each one runs on cold caches, several times slower than in a loop."""
    values = logits.numpy()
    token_ids: list[int] = values.argmax(axis=1).tolist()
    return [t if math.isfinite(row[t]) else INVALID_TOKEN for row, t in zip(values, token_ids)]


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row maximum, argmax) per row: the first maximum's index, as argmax gives it; a NaN row picks its NaN.

    On the CPU, max-with-index over a whole vocabulary runs scalar (7.6 ms for 256 x 49,152 on 2 cores): a
    vectorized max per block of the row, the best block, then the index inside that one block gives the same
    answer in 1.6 ms. Elsewhere (and for a vocabulary no block size divides) one max does both."""
    rows, vocab = logits.shape
    block = next((b for b in _CPU_BLOCKS if vocab % b == 0), None) if logits.device.type == "cpu" else None
    if block is None:
        row_max, token_ids = logits.max(dim=-1)
        return row_max, token_ids
    blocks = logits.reshape(rows, vocab // block, block)
    block_max = blocks.amax(dim=-1)
    best = block_max.argmax(dim=-1)
    row_max = block_max.gather(1, best[:, None])[:, 0]
    inside = blocks[torch.arange(rows, device=logits.device), best].argmax(dim=-1)
    return row_max, best * block + inside


def apply_penalties(scores: torch.Tensor, requests: Sequence[SequenceState]) -> None:
    """In place: repetition (prompt + output), then frequency and presence (output only)."""
    rows = [i for i, r in enumerate(requests) if r.params.needs_penalties]
    if not rows:
        return
    penalised = [requests[i] for i in rows]
    row_index = torch.tensor(rows, device=scores.device)
    sub = scores.index_select(0, row_index)
    vocab_size = sub.shape[1]

    if any(r.params.repetition_penalty != 1.0 for r in penalised):
        seen = _token_counts([r.all_token_ids for r in penalised], vocab_size, sub.device) > 0
        penalty = _column([r.params.repetition_penalty for r in penalised], sub.device)
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)

    if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in penalised):
        counts = _token_counts([r.output_token_ids for r in penalised], vocab_size, sub.device)
        frequency = _column([r.params.frequency_penalty for r in penalised], sub.device)
        presence = _column([r.params.presence_penalty for r in penalised], sub.device)
        sub = sub - frequency * counts - presence * (counts > 0).float()

    scores.index_copy_(0, row_index, sub)


def apply_logit_bias(scores: torch.Tensor, requests: Sequence[SequenceState]) -> None:
    """In place: add each request's logit_bias; ids beyond the logits (padding) are ignored."""
    vocab_size = scores.shape[1]
    rows: list[int] = []
    columns: list[int] = []
    values: list[float] = []
    for row, request in enumerate(requests):
        for token_id, bias in request.params.logit_bias.items():
            if token_id < vocab_size:
                rows.append(row)
                columns.append(token_id)
                values.append(bias)
    if rows:
        index = (torch.tensor(rows, device=scores.device), torch.tensor(columns, device=scores.device))
        scores.index_put_(index, torch.tensor(values, dtype=scores.dtype, device=scores.device), accumulate=True)


def mask_stops_before_min_tokens(scores: torch.Tensor, requests: Sequence[SequenceState]) -> None:
    """In place: a request that has not reached min_tokens may not pick a token that ends it.

    Not under a grammar: where the structure is complete the grammar allows only its stop tokens."""
    vocab_size = scores.shape[1]
    rows: list[int] = []
    columns: list[int] = []
    for row, request in enumerate(requests):
        params = request.params
        if request.num_output_tokens >= params.min_tokens or params.guided is not None:
            continue
        enders = set(params.stop_token_ids)
        if not params.ignore_eos:
            enders |= request.eos_token_ids
        for token_id in enders:
            if token_id < vocab_size:
                rows.append(row)
                columns.append(token_id)
    if rows:
        index = (torch.tensor(rows, device=scores.device), torch.tensor(columns, device=scores.device))
        scores.index_put_(index, torch.tensor(float("-inf"), device=scores.device))


@dataclass(frozen=True)
class SamplingColumns:
    """A batch's sampling parameters as [rows, 1] device tensors. The sampler keeps the last batch's and builds
    them again only when requests joined or left, not from lists every step."""

    request_ids: tuple[str, ...]
    temperature: torch.Tensor
    top_k: torch.Tensor
    """A row without top-k has the vocabulary size."""
    top_p: torch.Tensor
    log_min_p: torch.Tensor
    is_greedy: torch.Tensor
    """[rows] bool."""
    any_top_k_or_p: bool
    any_min_p: bool

    @classmethod
    def of(cls, requests: Sequence[SequenceState], vocab_size: int, device: torch.device) -> SamplingColumns:
        params = [r.params for r in requests]
        sampled = [p for p in params if not p.greedy]
        return cls(
            request_ids=tuple(r.request_id for r in requests),
            temperature=_column([1.0 if p.greedy else p.temperature for p in params], device),
            top_k=_column([p.top_k if p.top_k > 0 else vocab_size for p in params], device),
            top_p=_column([p.top_p if p.top_p < 1.0 else _TOP_P_DISABLED for p in params], device),
            log_min_p=_column([p.min_p for p in params], device).log(),
            is_greedy=torch.tensor([p.greedy for p in params], device=device),
            any_top_k_or_p=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
        )


def filter_for_sampling(scores: torch.Tensor, requests: Sequence[SequenceState],
                        columns: SamplingColumns | None = None) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; filtered tokens get -inf. Greedy rows pass through."""
    vocab_size = scores.shape[1]
    columns = columns or SamplingColumns.of(requests, vocab_size, scores.device)
    scores = scores / columns.temperature

    if columns.any_top_k_or_p:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=scores.device)
        sorted_scores.masked_fill_(ranks >= columns.top_k, float("-inf"))
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_scores.masked_fill_(mass_before >= columns.top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter_(1, order, sorted_scores)

    if columns.any_min_p:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); the max token always survives.
        threshold = scores.max(dim=-1, keepdim=True).values + columns.log_min_p
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    return scores


def _flag_invalid(token_ids: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Broken rows get INVALID_TOKEN: flagged within the step's one transfer, not with a second."""
    return torch.where(finite, token_ids, INVALID_TOKEN)


def _with_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, requests: Sequence[SequenceState], top_n: int, finite: torch.Tensor
) -> list[SampledToken]:
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    chosen = logprobs.gather(1, token_ids[:, None])
    top_values, top_ids = logprobs.topk(top_n, dim=-1)
    # float64 holds every token id exactly, so ids and logprobs share the one transfer.
    packed = torch.cat(
        [_flag_invalid(token_ids, finite)[:, None].double(), chosen.double(), top_ids.double(),
         top_values.double()], dim=1
    ).tolist()

    sampled = []
    for request, row in zip(requests, packed):
        token_id = int(row[0])
        wanted = request.params.logprobs
        if wanted is None:
            sampled.append(SampledToken(token_id, None))
            continue
        ids, values = row[2 : 2 + top_n], row[2 + top_n :]
        top = [(int(ids[i]), values[i]) for i in range(wanted)]
        sampled.append(SampledToken(token_id, TokenLogprob(token_id, row[1], top)))
    return sampled


def _is_plain_greedy(request: SequenceState) -> bool:
    start = request.params.plain_greedy_from
    return start is not None and request.num_output_tokens >= start


def _token_counts(token_lists: list[TokenIds], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab_size] occurrence counts, built with one scatter_add."""
    width = max(1, max(len(tokens) for tokens in token_lists))
    padded = np.full((len(token_lists), width), vocab_size, dtype=np.int64)  # counted in a column that is dropped
    for row, tokens in enumerate(token_lists):
        padded[row, :len(tokens)] = tokens
    index = torch.from_numpy(padded).to(device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _column(values: list[float] | list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]
