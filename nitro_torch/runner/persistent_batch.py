"""The runner's requests as rows of preallocated host arrays (vLLM v1's InputBatch idea).

Token ids, token and computed counts and block tables live in numpy arrays, written only where a request joins
(`apply`), gains blocks, or samples (`record`). A step's inputs are gathered from them with a few vectorized ops
(`inputs`) instead of being rebuilt from Python lists, so a decode row costs the same few array reads however
long the sequence is. The arrays grow (by doubling) when more requests or longer sequences arrive.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import numpy as np

from nitro_torch.runner.input_batch import HostBatch
from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput
from nitro_torch.sampling import SamplingParams

_INITIAL_ROWS = 8
_INITIAL_TOKENS = 512
_NEVER = np.iinfo(np.int64).max
_NO_RUN = -1
_FEW_ROWS = 4
"""Up to this many decode rows, scalar reads beat vectorized ops (each numpy call costs microseconds)."""


class RequestState:
    """One request the runner holds: its parameters here, its tokens and blocks in the batch's row `row`."""

    __slots__ = ("request_id", "params", "eos_token_ids", "num_prompt_tokens", "row", "_batch")

    def __init__(self, new: NewRequest, row: int, batch: PersistentBatch) -> None:
        self.request_id = new.request_id
        self.params: SamplingParams = new.params
        self.eos_token_ids = new.eos_token_ids
        self.num_prompt_tokens = new.num_prompt_tokens
        self.row = row
        self._batch = batch

    @property
    def num_tokens(self) -> int:
        return int(self._batch.num_tokens[self.row])

    @property
    def num_output_tokens(self) -> int:
        return int(self._batch.num_tokens[self.row]) - self.num_prompt_tokens

    @property
    def num_computed_tokens(self) -> int:
        return int(self._batch.num_computed[self.row])

    @property
    def all_token_ids(self) -> np.ndarray:
        """A view of the row's tokens (no copy): valid until the batch records the next step."""
        return self._batch.token_ids[self.row, :self.num_tokens]

    @property
    def output_token_ids(self) -> np.ndarray:
        return self._batch.token_ids[self.row, self.num_prompt_tokens:self.num_tokens]

    @property
    def block_ids(self) -> list[int]:
        return self._batch.block_table[self.row, :self._batch.num_blocks[self.row]].tolist()


class PersistentBatch(Mapping[str, RequestState]):
    """Request id -> its state; the arrays behind them; the step's inputs gathered from the arrays."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._states: dict[str, RequestState] = {}
        self._row_of: dict[str, int] = {}
        self.token_ids = np.zeros((_INITIAL_ROWS, _INITIAL_TOKENS), dtype=np.int64)
        self.num_tokens = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        self.num_computed = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        self.block_table = np.zeros((_INITIAL_ROWS, -(-_INITIAL_TOKENS // block_size)), dtype=np.int64)
        self.num_blocks = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        self.num_pending = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        """Tokens sampled in a step still in flight (asynchronous scheduling), not yet in `token_ids`."""
        self.plain_greedy_at = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        """Token count from which the row samples by a plain argmax (_NEVER: it never does)."""
        self.block_run_start = np.full(_INITIAL_ROWS, _NO_RUN, dtype=np.int64)
        """The row's first block when its blocks follow each other (one run of the cache, which a lone decode reads
        as a slice), else _NO_RUN: kept as blocks join, so no step compares a whole table."""
        self._free_rows: list[int] = list(range(_INITIAL_ROWS - 1, -1, -1))
        self._last_step: tuple[SchedulerOutput | None, list[str], np.ndarray] = (None, [], np.zeros(0, np.int64))
        """The step `inputs` gathered last, its request ids and rows: `record` of the same step reuses them."""

    # Mapping ----------------------------------------------------------------------------------------

    def __getitem__(self, request_id: str) -> RequestState:
        return self._states[request_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    # keeping in step with the scheduler -------------------------------------------------------------

    def apply(self, step: SchedulerOutput) -> None:
        """Before the step's forward: requests that left are dropped, new ones get a row, grown ones their blocks."""
        for request_id in step.finished_request_ids:
            if self._states.pop(request_id, None) is not None:
                self._free_rows.append(self._row_of.pop(request_id))
        for new in step.new_requests:
            self._add(new)
        for request_id, block_ids in step.new_block_ids.items():
            row = self._row_of[request_id]
            start = int(self.num_blocks[row])
            self._fit(row + 1, (start + len(block_ids)) * self.block_size)
            self.block_table[row, start:start + len(block_ids)] = block_ids
            self.num_blocks[row] = start + len(block_ids)
            run_start = int(self.block_run_start[row])
            if start == 0:
                self.block_run_start[row] = _run_start(block_ids)
            elif run_start != _NO_RUN and _run_start(block_ids) != run_start + start:
                self.block_run_start[row] = _NO_RUN

    def record(self, step: SchedulerOutput, sampled: Mapping[str, int]) -> None:
        """After a step's forward and sampling: computed counts advance; each sampled token joins its request."""
        self.advance(step)
        self.append(sampled)

    def advance(self, step: SchedulerOutput, pending: Collection[str] = ()) -> None:
        """Computed counts advance by the step's tokens; `pending`: requests whose sampled token is on its way
        (asynchronous scheduling: the next step computes it before `append(..., were_pending=True)`)."""
        counts = step.num_scheduled_tokens
        if len(counts) <= _FEW_ROWS:
            for request_id, count in counts.items():
                self.num_computed[self._row_of[request_id]] += count
        else:
            last_step, _, rows = self._last_step
            if last_step is not step:
                rows = self._rows(counts)
            if sum(counts.values()) == len(rows):
                self.num_computed[rows] += 1
            else:
                self.num_computed[rows] += np.fromiter(counts.values(), np.int64, len(rows))
        for request_id in pending:
            self.num_pending[self._row_of[request_id]] += 1

    def append(self, sampled: Mapping[str, int], were_pending: bool = False) -> None:
        """Each sampled token joins its request (one that left since is skipped when the tokens were pending)."""
        if were_pending:
            sampled = {request_id: token for request_id, token in sampled.items() if request_id in self._row_of}
        if not sampled:
            return
        if len(sampled) <= _FEW_ROWS:
            for request_id, token_id in sampled.items():
                row = self._row_of[request_id]
                length = int(self.num_tokens[row])
                if length >= self.token_ids.shape[1]:
                    self._fit(self.token_ids.shape[0], length + 1)
                self.token_ids[row, length] = token_id
                self.num_tokens[row] = length + 1
                if were_pending:
                    self.num_pending[row] -= 1
            return
        _, ids, rows = self._last_step
        if list(sampled) != ids:  # not every request of the last gathered step sampled, or in another order
            rows = self._rows(sampled)
        lengths = self.num_tokens[rows]
        if int(lengths.max()) >= self.token_ids.shape[1]:
            self._fit(self.token_ids.shape[0], int(lengths.max()) + 1)
        self.token_ids[rows, lengths] = np.fromiter(sampled.values(), np.int64, len(rows))
        self.num_tokens[rows] = lengths + 1
        if were_pending:
            self.num_pending[rows] -= 1

    def _add(self, new: NewRequest) -> None:
        if new.request_id in self._states:
            raise ValueError(f"the runner holds {new.request_id} already")
        if not self._free_rows:
            self._fit(2 * self.num_tokens.shape[0], self.token_ids.shape[1])
        row = self._free_rows.pop()
        count, num_blocks = len(new.token_ids), len(new.block_ids)
        self._fit(row + 1, max(count + 1, num_blocks * self.block_size))
        self.token_ids[row, :count] = new.token_ids
        self.num_tokens[row] = count
        self.num_computed[row] = new.num_computed_tokens
        self.num_pending[row] = 0
        self.block_table[row] = 0
        self.block_table[row, :num_blocks] = new.block_ids
        self.num_blocks[row] = num_blocks
        self.block_run_start[row] = _run_start(new.block_ids)
        plain_from = new.params.plain_greedy_from
        self.plain_greedy_at[row] = _NEVER if plain_from is None else new.num_prompt_tokens + plain_from
        self._row_of[new.request_id] = row
        self._states[new.request_id] = RequestState(new, row, self)

    def _fit(self, rows: int, tokens: int) -> None:
        """Grow the arrays (doubling) to hold `rows` rows of `tokens` tokens."""
        old_rows, old_tokens = self.token_ids.shape
        new_rows, new_tokens = old_rows, old_tokens
        while new_rows < rows:
            new_rows *= 2
        while new_tokens < tokens:
            new_tokens *= 2
        if (new_rows, new_tokens) == (old_rows, old_tokens):
            return
        width = -(-new_tokens // self.block_size)
        self.token_ids = _grown(self.token_ids, (new_rows, new_tokens))
        self.block_table = _grown(self.block_table, (new_rows, width))
        self.num_tokens = _grown(self.num_tokens, (new_rows,))
        self.num_computed = _grown(self.num_computed, (new_rows,))
        self.num_blocks = _grown(self.num_blocks, (new_rows,))
        self.num_pending = _grown(self.num_pending, (new_rows,))
        self.plain_greedy_at = _grown(self.plain_greedy_at, (new_rows,))
        self.block_run_start = _grown(self.block_run_start, (new_rows,))
        self._free_rows = list(range(new_rows - 1, old_rows - 1, -1)) + self._free_rows

    def _rows(self, by_request: Mapping[str, int]) -> np.ndarray:
        return np.fromiter(map(self._row_of.__getitem__, by_request), np.int64, len(by_request))

    # the step's inputs ------------------------------------------------------------------------------

    def inputs(self, step: SchedulerOutput) -> HostBatch:
        """The packed inputs of `step`: one-token rows (decodes) first, then the chunks; each scheduled request
        computes its tokens from its computed count on and samples when they reach its last known token."""
        counts = step.num_scheduled_tokens
        ids = list(counts)
        all_decodes = sum(counts.values()) == len(ids)  # every row computes one token: the usual decode step
        if all_decodes and len(ids) <= _FEW_ROWS:
            return self._few_decodes(ids)
        rows = self._rows(counts)
        self._last_step = (step, ids, rows)
        if all_decodes:
            return self._decodes(ids, rows)
        sizes = np.fromiter(counts.values(), np.int64, len(ids))
        decode_at = np.flatnonzero(sizes == 1)
        batch = self._decodes([ids[i] for i in decode_at.tolist()], rows[decode_at])
        parts_tokens, parts_positions, parts_slots = [batch.token_ids], [batch.positions], [batch.slots]
        offset = batch.num_decodes
        prefill_tables: list[np.ndarray] = []
        for index in np.flatnonzero(sizes != 1).tolist():
            row, count = int(rows[index]), int(sizes[index])
            start = int(self.num_computed[row])
            positions = np.arange(start, start + count)
            parts_tokens.append(self.token_ids[row, start:start + count])
            parts_positions.append(positions)
            parts_slots.append(self._slots(np.full(count, row), positions))
            batch.prefill_query_starts.append(offset)
            batch.prefill_query_lens.append(count)
            batch.prefill_context_lens.append(start + count)
            prefill_tables.append(self.block_table[row, :-(-(start + count) // self.block_size)])
            offset += count
            if start + count == int(self.num_tokens[row] + self.num_pending[row]):
                batch.logits_rows.append(offset - 1)
                batch.sampling.append(self._states[ids[index]])
        batch.all_plain_greedy = None  # the chunks' rows are not in it: the sampler asks each row
        width = max(len(t) for t in prefill_tables)
        batch.prefill_tables = np.stack([np.pad(t, (0, width - len(t))) for t in prefill_tables])
        batch.token_ids = np.concatenate(parts_tokens)
        batch.positions = np.concatenate(parts_positions)
        batch.slots = np.concatenate(parts_slots)
        return batch

    def _decodes(self, ids: list[str], rows: np.ndarray) -> HostBatch:
        """The one-token rows `rows` (of requests `ids`): each computes the token at its computed count."""
        if not ids:
            return HostBatch()
        positions = self.num_computed[rows]
        context_lens = positions + 1
        known = self.num_tokens[rows]
        width = self.token_ids.shape[1]
        batch = HostBatch(token_ids=self.token_ids[rows, np.minimum(positions, width - 1)], positions=positions,
                          slots=self._slots(rows, positions), num_decodes=len(ids),
                          decode_tables=self.block_table[rows, :int(self.num_blocks[rows].max())],
                          decode_context_lens=context_lens)
        if len(ids) == 1:
            batch.decode_first_block = _run_or_none(int(self.block_run_start[rows[0]]))
        pending = positions >= known  # the token was sampled in the step in flight: the device fills it in
        if pending.any():
            batch.pending_rows = np.flatnonzero(pending).tolist()
            batch.pending_ids = [ids[i] for i in batch.pending_rows]
        num_tokens = known + self.num_pending[rows]
        batch.all_plain_greedy = bool((num_tokens >= self.plain_greedy_at[rows]).all())
        samples = context_lens == num_tokens
        states = self._states
        if samples.all():
            batch.logits_rows = list(range(len(ids)))
            batch.sampling = [states[request_id] for request_id in ids]
        else:
            at = np.flatnonzero(samples).tolist()
            batch.logits_rows = at
            batch.sampling = [states[ids[i]] for i in at]
        return batch

    def _few_decodes(self, ids: list[str]) -> HostBatch:
        """`_decodes` for a few rows, in scalar reads."""
        bs, states = self.block_size, self._states
        rows = [self._row_of[request_id] for request_id in ids]
        positions = [int(self.num_computed[row]) for row in rows]
        widths = [int(self.num_blocks[row]) for row in rows]
        tables = self.block_table[rows, :max(widths)]  # past its own blocks a row holds 0: the padding
        known = [int(self.num_tokens[row]) for row in rows]
        batch = HostBatch(
            token_ids=np.array([self.token_ids[row, pos] if pos < count else 0
                                for row, pos, count in zip(rows, positions, known)], dtype=np.int64),
            positions=np.array(positions, dtype=np.int64),
            slots=np.array([self.block_table[row, pos // bs] * bs + pos % bs for row, pos in zip(rows, positions)],
                           dtype=np.int64),
            num_decodes=len(ids),
            decode_tables=tables,
            decode_context_lens=np.array([pos + 1 for pos in positions], dtype=np.int64))
        if len(rows) == 1:
            batch.decode_first_block = _run_or_none(int(self.block_run_start[rows[0]]))
        plain = True
        for index, (row, pos, count) in enumerate(zip(rows, positions, known)):
            if pos >= count:  # sampled in the step in flight: the device fills it in
                batch.pending_rows.append(index)
                batch.pending_ids.append(ids[index])
            num_tokens = count + int(self.num_pending[row])
            if pos + 1 == num_tokens:
                batch.logits_rows.append(index)
                batch.sampling.append(states[ids[index]])
                plain = plain and num_tokens >= self.plain_greedy_at[row]
        batch.all_plain_greedy = plain
        return batch

    def _slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return self.block_table[rows, positions // bs] * bs + positions % bs


def _run_start(block_ids: list[int]) -> int:
    """The first of `block_ids` when they follow each other, else _NO_RUN."""
    if not block_ids:
        return _NO_RUN
    first = block_ids[0]
    return first if all(b == first + i for i, b in enumerate(block_ids)) else _NO_RUN


def _run_or_none(run_start: int) -> int | None:
    return None if run_start == _NO_RUN else run_start


def _grown(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    grown = np.zeros(shape, dtype=array.dtype)
    grown[tuple(slice(0, n) for n in array.shape)] = array
    return grown
