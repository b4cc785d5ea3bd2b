"""A step as data + the runner's request states -> packed host lists (no tensors), and the one-copy upload."""

from __future__ import annotations

import torch

from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import Scheduler
from nitro_torch.runner.input_batch import HostBatch, build_host_batch, pad_rows, slot_of
from nitro_torch.runner.sequence import RequestStates
from nitro_torch.runner.staging import InputStaging
from nitro_torch.sampling import SamplingParams

BS = 4


def request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8, temperature=0), eos_token_ids=frozenset({2}),
                   max_total_tokens=64)


class Runner:
    """The runner's side of a step without a model: its states, kept by the scheduler's messages."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.states = RequestStates()

    def step(self) -> HostBatch:
        self.plan = self.scheduler.schedule()
        self.states.apply(self.plan.for_runner)
        return build_host_batch(self.plan.for_runner, self.states, BS)

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
    assert batch.token_ids == [99, *range(20, 28)]
    assert batch.positions == [6, *range(8)]
    assert batch.slots[0] == slot_of(first.block_ids, 6, BS)
    assert batch.slots[1:] == [slot_of(second.block_ids, p, BS) for p in range(8)]
    assert batch.decode_context_lens == [7]
    assert batch.decode_tables == [first.block_ids]
    assert batch.prefill_query_starts == [1] and batch.prefill_query_lens == [8]
    assert batch.prefill_context_lens == [8] and batch.prefill_cu_query_lens == [0, 8]
    assert batch.prefill_tables == [second.block_ids[:2]]
    # the chunk stops mid-prompt, so only the decode samples
    assert [state.request_id for state in batch.sampling] == ["a"] and batch.logits_rows == [0]
    assert batch.sampling[0].token_ids == [*range(10, 16), 99]


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


def test_pad_rows_pads_with_block_zero() -> None:
    assert pad_rows([[3], [4, 5, 6]]) == [[3, 0, 0], [4, 5, 6]]
    assert pad_rows([[1]], width=3) == [[1, 0, 0]]
    assert pad_rows([]) == []


def test_upload_packs_lists_and_rows_into_views_of_one_buffer() -> None:
    staging = InputStaging(torch.device("cpu"), initial_capacity=4)
    out = staging.upload({"ids": [1, 2, 3], "table": [[7, 8], [9, 10]], "empty": [], "lens": [5]})
    assert out["ids"].tolist() == [1, 2, 3]
    assert out["table"].tolist() == [[7, 8], [9, 10]]
    assert out["empty"].numel() == 0 and out["lens"].tolist() == [5]
    assert out["ids"].untyped_storage().data_ptr() == out["table"].untyped_storage().data_ptr()
    again = staging.upload({"ids": [4]})
    assert again["ids"].tolist() == [4]
