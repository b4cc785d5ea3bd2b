"""The CUDA fast path on a GPU: captured decode graphs and Triton kernels against the eager torch path, memory
sizing from --gpu-memory-utilization, and the kernels at serving shapes. Skipped without CUDA."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.runner.kernels import (
    paged_decode_reference,
    paged_decode_triton,
    prefill_paged_reference,
    prefill_paged_triton,
)
from nitro_torch.sampling import SamplingParams
from tests.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [list(range(300, 300 + n)) for n in (5, 17, 40, 3, 250, 64, 1, 33, 90)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:  # noqa: ANN001
    """Random Llama, head_dim 64, 4 layers, GQA 2."""
    return save_tiny_model(tmp_path_factory.mktemp("gpu-llama"), smol_tokenizer, hidden_size=256, num_layers=4)


@pytest.fixture(autouse=True)
def released_memory() -> None:
    """Each test starts with the earlier tests' engines gone, as a model switch frees the old engine."""
    gc.collect()
    torch.cuda.empty_cache()


def make_engine(model_dir: Path, **options: object) -> LLMEngine:
    """A fixed KV size unless a test sizes it from the memory budget."""
    config = build_config({"model": str(model_dir), "device": "cuda", "dtype": "float32", "max_num_seqs": 16,
                           "max_num_batched_tokens": 256, "num_kv_blocks": 512, **options}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def greedy(engine: LLMEngine) -> list[list[int]]:
    return engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))


def test_graphs_and_kernels_give_the_eager_torch_tokens(model_dir: Path) -> None:
    fast = make_engine(model_dir)
    assert fast.runner.graphs is not None and fast.runner.graphs._graphs, "decode graphs were not captured"
    assert sorted(fast.runner.graphs._graphs) == fast.runner.graphs.sizes
    fast_tokens = greedy(fast)
    assert fast.block_manager.num_used_blocks == 0
    del fast
    gc.collect()
    reference = make_engine(model_dir, cuda_graphs=False, attention_backend="torch")
    assert reference.runner.graphs is None
    assert greedy(reference) == fast_tokens


def test_asynchronous_scheduling_gives_the_synchronous_tokens(model_dir: Path) -> None:
    """Graph replays fed on the device with the previous step's sampled ids, copied back through pinned memory
    one step behind; a small KV cache so that requests are preempted while a step is in flight."""
    options = {"num_kv_blocks": 40, "max_num_seqs": 9}
    synchronous = greedy(make_engine(model_dir, **options))
    gc.collect()
    overlapped = make_engine(model_dir, async_scheduling=True, **options)
    assert overlapped.runner.graphs is not None
    assert greedy(overlapped) == synchronous
    assert overlapped.stats().num_preemptions > 0 and overlapped.block_manager.num_used_blocks == 0


def test_kv_blocks_come_from_the_memory_budget(model_dir: Path) -> None:
    before = torch.cuda.memory_allocated()
    engine = make_engine(model_dir, gpu_memory_utilization=0.3, num_kv_blocks=None)
    total = torch.cuda.mem_get_info()[1]
    kv_bytes = engine.kv_cache.num_blocks * engine.kv_cache.layout.bytes_per_block
    assert 0 < kv_bytes < 0.3 * total
    assert torch.cuda.memory_reserved() < 0.33 * total
    del engine
    gc.collect()
    # a model switch relies on this: the dropped engine's KV cache, graphs and weights are freed
    assert torch.cuda.memory_allocated() - before < 64 * 2**20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,groups", [(128, 4), (64, 8)])
def test_kernels_at_serving_shapes(dtype: torch.dtype, head_dim: int, groups: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    block_size, kv_heads, num_blocks = 16, 8, 2048
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn_like(k_cache)
    lengths = torch.randint(1, 1500, (64,), device="cuda", generator=gen)
    width = int(-(-lengths.max() // block_size))
    tables = torch.randint(0, num_blocks, (64, width), device="cuda", generator=gen)
    query = torch.randn(64, kv_heads * groups, head_dim, device="cuda", dtype=dtype, generator=gen)
    expected = paged_decode_reference(query, k_cache, v_cache, tables, lengths, head_dim ** -0.5)
    actual = paged_decode_triton(query, k_cache, v_cache, tables, lengths, head_dim ** -0.5)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)

    q_lens = torch.tensor([300, 1, 77, 512], device="cuda")
    context = q_lens + torch.tensor([0, 900, 33, 64], device="cuda")  # three of four reuse a cached prefix
    cu = torch.cat([torch.zeros(1, device="cuda", dtype=torch.long), q_lens.cumsum(0)])
    prefill_query = torch.randn(int(cu[-1]), kv_heads * groups, head_dim, device="cuda", dtype=dtype, generator=gen)
    expected = prefill_paged_reference(prefill_query, k_cache, v_cache, tables[:4], cu, context, head_dim ** -0.5)
    actual = prefill_paged_triton(prefill_query, k_cache, v_cache, tables[:4], cu, context, head_dim ** -0.5)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)
