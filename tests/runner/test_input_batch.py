"""A step as data + the runner's request states -> packed host lists (no tensors), and the one-copy upload."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import Scheduler
from nitro_torch.runner.input_batch import HostBatch
from nitro_torch.runner.persistent_batch import PersistentBatch
from nitro_torch.runner.staging import InputStaging
from nitro_torch.sampling import SamplingParams

BS = 4


def request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8, temperature=0), eos_token_ids=frozenset({2}),
                   max_total_tokens=64)


def slot_of(block_ids: list[int], position: int, block_size: int) -> int:
    return block_ids[position // block_size] * block_size + position % block_size


class Runner:
    """The runner's side of a step without a model: its states, kept by the scheduler's messages."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.states = PersistentBatch(BS)

    def step(self) -> HostBatch:
        self.plan = self.scheduler.schedule()
        self.states.apply(self.plan.for_runner)
        return self.states.inputs(self.plan.for_runner)

    def finish_step(self, sampled: dict[str, int]) -> None:
        self.states.record(self.plan.for_runner, sampled)
        self.scheduler.update(self.plan, sampled)


def test_decodes_first_then_chunks_with_slots_tables_and_sampling_rows() -> None:
    scheduler = Scheduler(BlockManager(32, BS, True), max_num_batched_tokens=9, max_num_seqs=8)
    runner = Runner(scheduler)
    first = request("a", list(range(10, 16)))  # 6 tokens
    scheduler.add(first)
    runner.step()
    runner.finish_step({"a": 99})
    second = request("b", list(range(20, 32)))  # 12 tokens: 8 fit beside a's decode, chunked
    scheduler.add(second)
    batch = runner.step()

    assert batch.num_decodes == 1 and not batch.is_pure_decode
    assert batch.token_ids.tolist() == [99, *range(20, 28)]
    assert batch.positions.tolist() == [6, *range(8)]
    assert batch.slots[0] == slot_of(first.block_ids, 6, BS)
    assert batch.slots[1:].tolist() == [slot_of(second.block_ids, p, BS) for p in range(8)]
    assert batch.decode_context_lens.tolist() == [7]
    assert batch.decode_tables.tolist() == [first.block_ids]
    assert batch.prefill_query_starts == [1] and batch.prefill_query_lens == [8]
    assert batch.prefill_context_lens == [8] and batch.prefill_cu_query_lens == [0, 8]
    assert batch.prefill_tables.tolist() == [second.block_ids[:2]]
    # the chunk stops mid-prompt, so only the decode samples
    assert [state.request_id for state in batch.sampling] == ["a"] and batch.logits_rows == [0]
    assert batch.sampling[0].all_token_ids.tolist() == [*range(10, 16), 99]


def test_prefix_hit_chunk_starts_after_the_cached_blocks() -> None:
    scheduler = Scheduler(BlockManager(32, BS, True), max_num_batched_tokens=64, max_num_seqs=8)
    runner = Runner(scheduler)
    prompt = list(range(40, 50))  # 10 tokens: two full blocks cacheable
    scheduler.add(request("a", prompt))
    runner.step()
    runner.finish_step({"a": 5})
    again = request("b", prompt)
    scheduler.add(again)
    batch = runner.step()
    start = again.num_cached_tokens
    assert start == 8
    index = [state.request_id for state in batch.sampling].index("b")
    chunk = batch.prefill_query_lens.index(len(prompt) - start)
    assert batch.prefill_context_lens[chunk] == len(prompt)
    assert batch.positions[batch.prefill_query_starts[chunk]] == start
    assert batch.logits_rows[index] == batch.prefill_query_starts[chunk] + len(prompt) - start - 1


def test_upload_gives_int64_tensors_of_arrays_lists_and_rows() -> None:
    staging = InputStaging(torch.device("cpu"), initial_capacity=4)
    out = staging.upload({"ids": [1, 2, 3], "table": [[7, 8], [9, 10]], "empty": [], "lens": np.array([5])})
    assert out["ids"].tolist() == [1, 2, 3] and out["ids"].dtype == torch.long
    assert out["table"].tolist() == [[7, 8], [9, 10]]
    assert out["empty"].numel() == 0 and out["lens"].tolist() == [5]
    again = staging.upload({"ids": [4]})
    assert again["ids"].tolist() == [4]


def test_the_persistent_batch_grows_and_reuses_rows() -> None:
    from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput

    batch = PersistentBatch(BS)
    params = SamplingParams(max_tokens=8, temperature=0)

    def new(i: int, length: int, computed: int) -> NewRequest:
        tokens = [1000 * i + t for t in range(length)]
        blocks = [100 * i + b for b in range(-(-length // BS))]
        return NewRequest(f"r{i}", tokens, length, params, frozenset(), blocks, computed)

    # more rows and longer sequences than the arrays start with
    first = SchedulerOutput(new_requests=[new(i, 600 + i, 599 + i) for i in range(20)])
    first.num_scheduled_tokens = {f"r{i}": 1 for i in range(20)}
    batch.apply(first)
    inputs = batch.inputs(first)
    assert inputs.token_ids.tolist() == [1000 * i + 599 + i for i in range(20)]
    assert inputs.logits_rows == list(range(20))
    assert [s.request_id for s in inputs.sampling] == list(first.num_scheduled_tokens)
    assert inputs.decode_tables.shape == (20, -(-619 // BS))
    assert inputs.decode_tables[0, :3].tolist() == [0, 1, 2] and inputs.decode_tables[0, -1] == 0  # padded
    batch.record(first, {f"r{i}": 7 for i in range(20)})
    assert batch["r3"].output_token_ids.tolist() == [7] and batch["r3"].num_computed_tokens == 603

    second = SchedulerOutput(finished_request_ids=["r0", "r1"], new_requests=[new(30, 5, 1)],
                             new_block_ids={"r2": [999]}, num_scheduled_tokens={"r2": 1, "r30": 4})
    batch.apply(second)
    assert "r0" not in batch and len(batch) == 19
    assert batch["r30"].all_token_ids.tolist() == [30000 + t for t in range(5)]  # a freed row, rewritten
    assert batch["r2"].block_ids[-1] == 999
    inputs = batch.inputs(second)
    assert inputs.num_decodes == 1 and inputs.prefill_query_lens == [4]
    assert inputs.token_ids.tolist() == [7, 30001, 30002, 30003, 30004]


@pytest.mark.parametrize("num_rows", [1, 3, 6, 40])  # the scalar path for a few rows and the vectorized one
def test_decode_rows_gather_each_requests_token_slot_and_table(num_rows: int) -> None:
    from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput

    rng = random.Random(num_rows)
    batch = PersistentBatch(BS)
    step = SchedulerOutput()
    for i in range(num_rows):
        length = rng.randint(2, 30)
        tokens = [rng.randint(0, 999) for _ in range(length)]
        blocks = rng.sample(range(500), -(-length // BS))
        step.new_requests.append(NewRequest(f"r{i}", tokens, length, SamplingParams(), frozenset(), blocks,
                                            length - 1 - rng.randint(0, 1)))  # some rows decode mid-prompt
        step.num_scheduled_tokens[f"r{i}"] = 1
    batch.apply(step)
    inputs = batch.inputs(step)
    expected_rows = []
    for index, new in enumerate(step.new_requests):
        pos = new.num_computed_tokens
        assert inputs.token_ids[index] == new.token_ids[pos] and inputs.positions[index] == pos
        assert inputs.slots[index] == slot_of(new.block_ids, pos, BS)
        assert inputs.decode_context_lens[index] == pos + 1
        width = inputs.decode_tables.shape[1]
        assert inputs.decode_tables[index].tolist() == new.block_ids + [0] * (width - len(new.block_ids))
        if pos + 1 == len(new.token_ids):
            expected_rows.append(index)
    assert inputs.logits_rows == expected_rows
    assert [s.request_id for s in inputs.sampling] == [f"r{i}" for i in expected_rows]
    batch.record(step, {f"r{i}": 5 for i in expected_rows})
    for index, new in enumerate(step.new_requests):
        state = batch[new.request_id]
        assert state.num_computed_tokens == new.num_computed_tokens + 1
        assert state.all_token_ids.tolist() == new.token_ids + ([5] if index in expected_rows else [])


@pytest.mark.parametrize("num_rows", [2, 8])
def test_the_plain_greedy_hint_agrees_with_each_rows_parameters(num_rows: int) -> None:
    from nitro_torch.runner.sampler import _is_plain_greedy
    from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput

    for special in (None, SamplingParams(temperature=0.7), SamplingParams(temperature=0, min_tokens=3),
                    SamplingParams(temperature=0, min_tokens=1), SamplingParams(temperature=0, logprobs=2),
                    SamplingParams(temperature=0, presence_penalty=0.5)):
        batch = PersistentBatch(BS)
        step = SchedulerOutput()
        for i in range(num_rows):
            params = special if (special is not None and i == 1) else SamplingParams(temperature=0)
            tokens = [7] * 6  # 5 prompt tokens and one output token
            step.new_requests.append(NewRequest(f"r{i}", tokens, 5, params, frozenset(), [i], 5))
            step.num_scheduled_tokens[f"r{i}"] = 1
        batch.apply(step)
        inputs = batch.inputs(step)
        assert inputs.all_plain_greedy == all(_is_plain_greedy(s) for s in inputs.sampling), special


def test_a_lone_decode_knows_whether_its_blocks_are_one_run_as_blocks_join() -> None:
    """Its first block when the blocks follow each other (attention then reads one slice), else None."""
    from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput

    batch = PersistentBatch(BS)
    params = SamplingParams(max_tokens=8, temperature=0)

    def decode_of(request_id: str, step: SchedulerOutput) -> HostBatch:
        step.num_scheduled_tokens = {request_id: 1}
        batch.apply(step)
        inputs = batch.inputs(step)
        batch.record(step, {request_id: 3})
        return inputs

    join = SchedulerOutput(new_requests=[NewRequest("a", list(range(8)), 8, params, frozenset(), [40, 41], 7)])
    assert decode_of("a", join).decode_first_block == 40
    assert decode_of("a", SchedulerOutput(new_block_ids={"a": [42, 43]})).decode_first_block == 40  # still one run
    assert decode_of("a", SchedulerOutput(new_block_ids={"a": [7]})).decode_first_block is None  # broken
    assert decode_of("a", SchedulerOutput(new_block_ids={"a": [8]})).decode_first_block is None  # stays broken
    scattered = NewRequest("b", list(range(8)), 8, params, frozenset(), [5, 9], 7)
    again = SchedulerOutput(finished_request_ids=["a"], new_requests=[scattered])  # b takes a's freed row
    assert decode_of("b", again).decode_first_block is None
    rejoin = SchedulerOutput(finished_request_ids=["b"],
                             new_requests=[NewRequest("c", list(range(5)), 5, params, frozenset(), [60, 61], 4)])
    assert decode_of("c", rejoin).decode_first_block == 60
    for rows in (2, 9):  # several decodes: no lone row to read as a slice
        many = SchedulerOutput(new_requests=[NewRequest(f"m{rows}-{i}", [1, 2], 2, params, frozenset(), [200 + i], 1)
                                             for i in range(rows)])
        many.num_scheduled_tokens = {new.request_id: 1 for new in many.new_requests}
        batch.apply(many)
        assert batch.inputs(many).decode_first_block is None
