"""`nitro-torch bench --workload host-overhead`: the engine's own host time per step, without the model.

A 1-layer, 64-wide random Llama with the default model's tokenizer (vocabulary 49,152, so detokenizing is real)
makes the forward almost free; 1, 64 and 256 sequences decode (32-token random prompts, EOS ignored, greedy).
For each batch size the median over the timed steps of:

- core step:    `EngineCore.step()` wall time minus the model forward (LM head included): scheduling, inputs,
                sampling and its bookkeeping. This is what runs in the engine-core process, serial with the GPU.
- of which sampling: the sampler's share of it (on CUDA its vocabulary-wide kernels run on the device).
- API side:     the output processor on that step's outputs (detokenizing, stop strings): in the server it runs
                in the API process, beside the core, not in its step.
- engine step:  `LLMEngine.step()` (core + output processing in one call, the unit an engine step was before the
                core moved out) minus the forward.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

BATCH_SIZES = (1, 64, 256)
PROMPT_TOKENS = 32
TIMED_STEPS = 40
MAX_TOKENS = 200
WARM_STEPS = 3


@dataclass
class HostOverhead:
    num_seqs: int
    core_host_ms: float
    sampling_ms: float
    api_side_ms: float
    engine_host_ms: float
    forward_ms: float

    @property
    def core_us_per_seq(self) -> float:
        return self.core_host_ms * 1000 / self.num_seqs


class _Timer:
    """Accumulates the time spent inside one method of an object (wrapped in place)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.total = 0.0
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - started

        setattr(owner, name, timed)

    @contextmanager
    def measure(self) -> Iterator[Callable[[], float]]:
        start = self.total
        yield lambda: self.total - start


def tiny_engine(num_seqs: int, tokenizer: Any) -> Any:
    """An LLMEngine over a 1-layer, 64-wide random Llama that uses `tokenizer`."""
    from nitro_torch.config import build_config
    from nitro_torch.engine.engine import LLMEngine

    blocks_per_seq = -(-(PROMPT_TOKENS + MAX_TOKENS) // 16) + 1
    config = build_config({"max_num_seqs": num_seqs, "max_num_batched_tokens": max(2048, num_seqs * PROMPT_TOKENS),
                           "num_kv_blocks": num_seqs * blocks_per_seq, "device": "cpu"}, env={})
    return LLMEngine(tiny_loaded_model(tokenizer), config)


def tiny_loaded_model(tokenizer: Any, num_layers: int = 1, tied: bool = True, seed: int = 0) -> Any:
    """A 64-wide random Llama with `tokenizer`'s vocabulary, built in memory on the CPU, as the loader returns one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nitro_torch.models.loader import LoadedModel
    from nitro_torch.runner.attention import register_paged_attention

    torch.manual_seed(seed)
    model_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=2048, tie_word_embeddings=tied)
    model_config._attn_implementation = register_paged_attention()
    model = AutoModelForCausalLM.from_config(model_config).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{num_layers}x64", source_path="",
                       device=torch.device("cpu"), dtype=torch.float32, max_model_len=2048,
                       eos_token_ids=frozenset({tokenizer.eos_token_id}))


def measure(num_seqs: int, tokenizer: Any, steps: int = TIMED_STEPS) -> HostOverhead:
    from nitro_torch.sampling import SamplingParams

    engine = tiny_engine(num_seqs, tokenizer)
    core = engine.core
    forward = _Timer(core.runner.model, "forward")
    sampling = _Timer(core.sampler, "sample")
    rng = random.Random(0)
    for i in range(num_seqs):
        prompt = [rng.randrange(100, len(tokenizer)) for _ in range(PROMPT_TOKENS)]
        engine.add_request(f"seq-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    while any(r.num_computed_tokens < PROMPT_TOKENS for r in core.requests.values()):
        engine.step()
    for _ in range(WARM_STEPS):
        engine.step()
    core_host, sample_ms, api_side, engine_host, forward_ms = [], [], [], [], []
    for _ in range(steps):
        with forward.measure() as forward_s, sampling.measure() as sample_s:
            started = time.perf_counter()
            outputs = core.step()
            core_s = time.perf_counter() - started
        assert len(outputs) == num_seqs, "every sequence decodes every step"
        started = time.perf_counter()
        engine.processor.process(outputs)
        api_side.append(time.perf_counter() - started)
        core_host.append(core_s - forward_s())
        sample_ms.append(sample_s())
        forward_ms.append(forward_s())
        with forward.measure() as forward_s:
            started = time.perf_counter()
            engine.step()
            engine_host.append(time.perf_counter() - started - forward_s())
    ms = lambda values: round(statistics.median(values) * 1000, 4)  # noqa: E731
    return HostOverhead(num_seqs, ms(core_host), ms(sample_ms), ms(api_side), ms(engine_host), ms(forward_ms))


def run_host_overhead(args: argparse.Namespace) -> int:
    from nitro_torch.models.loader import load_tokenizer

    tokenizer = load_tokenizer("default")
    sizes = [n for n in BATCH_SIZES if not args.limit or n <= args.limit] or [1]
    print(f"host overhead per engine step (medians of {TIMED_STEPS} decode steps; torch threads "
          f"{torch.get_num_threads()}; 1-layer 64-wide random Llama, vocabulary {len(tokenizer)})")
    header = (f"{'seqs':>5} | {'core host ms':>12} | {'us/seq':>7} | {'of which sampling ms':>20} | "
              f"{'API side ms':>11} | {'engine step ms':>14} | {'forward ms':>10}")
    print(header)
    print("-" * len(header))
    results = []
    for num_seqs in sizes:
        result = measure(num_seqs, tokenizer)
        results.append(result)
        print(f"{num_seqs:>5} | {result.core_host_ms:>12.3f} | {result.core_us_per_seq:>7.1f} | "
              f"{result.sampling_ms:>20.3f} | {result.api_side_ms:>11.3f} | {result.engine_host_ms:>14.3f} | "
              f"{result.forward_ms:>10.3f}")
    if args.json:
        payload = {"workload": "host-overhead", "torch_threads": torch.get_num_threads(),
                   "results": [{**asdict(r), "core_us_per_seq": r.core_us_per_seq} for r in results]}
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
    return 0
