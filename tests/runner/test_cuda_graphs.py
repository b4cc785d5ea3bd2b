"""Decode-graph bookkeeping without a GPU: sizes, padding, static buffers, and the padded static-buffer step
(the path a captured graph replays) giving the same logits as the plain eager step on a real (tiny) model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention, set_attention_backend
from nitro_torch.runner.cuda_graphs import DecodeBuffers, DecodeGraphs, DecodeInputs, capture_sizes, padded_size
from nitro_torch.sampling import SamplingParams


def test_capture_sizes_are_powers_of_two_then_the_maximum() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert capture_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]


def test_padded_size_is_the_smallest_graph_that_holds_the_batch() -> None:
    sizes = capture_sizes(48)
    assert [padded_size(n, sizes) for n in (1, 3, 5, 16, 17, 33, 48)] == [1, 4, 8, 16, 32, 48, 48]
    assert padded_size(49, sizes) is None


def decode_inputs(rows: int, width: int) -> DecodeInputs:
    def seq(start: int) -> torch.Tensor:
        return torch.arange(start, start + rows)

    return DecodeInputs(seq(100), seq(10), seq(1000), torch.arange(rows * width).view(rows, width) + 1, seq(11))


def test_fill_writes_the_rows_and_pads_the_rest() -> None:
    buffers = DecodeBuffers(max_batch=8, max_blocks_per_seq=4, device=torch.device("cpu"))
    buffers.fill(decode_inputs(5, 3), size=8)
    assert buffers.input_ids.tolist() == [100, 101, 102, 103, 104, 0, 0, 0]
    assert buffers.positions.tolist() == [10, 11, 12, 13, 14, 0, 0, 0]
    assert buffers.slot_mapping.tolist() == [1000, 1001, 1002, 1003, 1004, -1, -1, -1]
    assert buffers.context_lens.tolist() == [11, 12, 13, 14, 15, 0, 0, 0]
    assert buffers.block_tables[:5, :3].tolist() == (torch.arange(15).view(5, 3) + 1).tolist()

    buffers.fill(decode_inputs(2, 1), size=2)  # a smaller batch later: rows 2.. of the size-8 view are not touched
    assert buffers.slot_mapping[:2].tolist() == [1000, 1001]
    assert buffers.block_tables[:2, 0].tolist() == [1, 2]
    meta = buffers.metadata(kv_cache=None, size=2)  # type: ignore[arg-type]
    assert meta.num_decode_tokens == 2 and meta.decode_block_tables.shape == (2, 4)


def test_fill_refuses_batches_that_do_not_fit() -> None:
    buffers = DecodeBuffers(max_batch=4, max_blocks_per_seq=2, device=torch.device("cpu"))
    with pytest.raises(ValueError):
        buffers.fill(decode_inputs(5, 1), size=4)
    with pytest.raises(ValueError):
        buffers.fill(decode_inputs(2, 3), size=4)


# --- the padded static-buffer step on a real model -------------------------------------------------------------

PROMPTS = [list(range(300, 300 + n)) for n in (5, 17, 40, 3)] + [list(range(300, 317)) + [9, 8, 7]]
"""Ragged lengths; the last shares the second's first 16 tokens (a prefix-cache hit); 40 is chunked."""


@pytest.fixture
def engine(tiny_model_dir: str) -> LLMEngine:
    """A fresh engine per test: an empty prefix cache, so every test sees the chunked and cached prefills."""
    config = build_config({"model": tiny_model_dir, "device": "cpu", "max_num_seqs": 8,
                           "max_num_batched_tokens": 32, "num_kv_blocks": 64}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def run_in_lockstep(engine: LLMEngine, variants: dict[str, Callable[[], None]], max_tokens: int = 6) -> int:
    """Run PROMPTS to completion; every step runs under each variant and their logits must agree.
    Tokens come from the first variant. Returns the number of steps compared."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    steps = 0
    while engine.scheduler.has_work:
        plan = engine.scheduler.schedule()
        engine.runner.requests.apply(plan.for_runner)
        results = {}
        for name, activate in variants.items():
            activate()
            logits, sampling = engine.runner.execute(plan.for_runner)
            results[name] = None if logits is None else logits.clone()
        first, *others = results.values()
        for name, logits in zip(list(results)[1:], others):
            if first is None:
                assert logits is None
            else:
                torch.testing.assert_close(logits, first, atol=2e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        tokens = [] if first is None else first.argmax(-1).tolist()
        sampled = {r.request_id: t for r, t in zip(sampling, tokens)}
        engine.runner.requests.record(plan.for_runner, sampled)
        engine.scheduler.update(plan, sampled)
        steps += 1
    for i in range(len(PROMPTS)):
        engine.core.requests.pop(f"r{i}", None)
        engine.processor.forget(f"r{i}")
    assert engine.block_manager.num_used_blocks == 0
    return steps


def counting(graphs: DecodeGraphs) -> list[int]:
    calls: list[int] = []
    run = graphs.run

    def counted(inputs: DecodeInputs) -> torch.Tensor:
        calls.append(inputs.input_ids.shape[0])
        return run(inputs)

    graphs.run = counted  # type: ignore[method-assign]
    return calls


def test_padded_decode_step_matches_the_eager_step(engine: LLMEngine) -> None:
    engine.runner.enable_decode_graphs(max_num_seqs=8, max_model_len=engine.max_model_len, capture=False)
    graphs = engine.runner.graphs
    assert graphs is not None
    calls = counting(graphs)

    def eager() -> None:
        engine.runner.graphs = None

    def padded() -> None:
        engine.runner.graphs = graphs

    try:
        run_in_lockstep(engine, {"eager": eager, "padded graph step": padded})
    finally:
        engine.runner.graphs = None
    assert calls and 5 in calls  # 5 decoding requests ran in the size-8 graph's buffers


def test_triton_kernels_match_torch_attention_in_the_engine(engine: LLMEngine) -> None:
    """Prefill chunks (one with a cached prefix, one continuing a chunked prompt), decodes, and decodes
    padded to a graph size, through the Triton kernels (Triton's interpreter on CPU) against torch."""
    engine.runner.enable_decode_graphs(max_num_seqs=8, max_model_len=engine.max_model_len, capture=False)
    graphs = engine.runner.graphs

    def torch_eager() -> None:
        set_attention_backend("torch")
        engine.runner.graphs = None

    def triton_eager() -> None:
        set_attention_backend("triton")
        engine.runner.graphs = None

    def triton_padded() -> None:
        set_attention_backend("triton")
        engine.runner.graphs = graphs

    try:
        steps = run_in_lockstep(engine, {"torch": torch_eager, "triton": triton_eager,
                                         "triton, padded graph step": triton_padded}, max_tokens=3)
    finally:
        set_attention_backend("auto")
        engine.runner.graphs = None
    assert steps >= 4
