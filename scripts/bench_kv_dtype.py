"""Decode steps over a float16 KV cache against a float32 one, in one process on the embedded model's packed CPU
weights: for each shape (sequences x context tokens), both engines take turns for `--rounds` rounds; prints the
median step time of each and their ratio.

    .venv/bin/python scripts/bench_kv_dtype.py --shapes 32x300 1x300 1x2000
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

DTYPES = ("float32", "float16")
STEPS = 12


def decode_step_seconds(engine: LLMEngine, num_seqs: int, context: int, seed: int) -> float:
    """Median time of `STEPS` decode steps of `num_seqs` requests whose prompts are `context` tokens."""
    rng = random.Random(seed)
    ids = [f"s{seed}-{i}" for i in range(num_seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS + 3, ignore_eos=True)
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(1000, 40000) for _ in range(context)], params)
    requests = engine.core.requests
    while any(requests[i].num_computed_tokens < context for i in ids):
        engine.step()
    engine.step()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    while engine.has_unfinished_requests:
        engine.step()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["32x300", "1x300", "1x2000"],
                        help="SEQSxCONTEXT: that many requests decoding after prompts of that many tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    model_options = build_config({"model": "default", "device": "cpu", "cpu_weights": "auto"}, env={}).model
    loaded = load_model(model_options, attn_implementation=register_paged_attention())
    longest = max(context for _, context in shapes) + STEPS + 8
    blocks = max(seqs * -(-(context + STEPS + 8) // 16) for seqs, context in shapes) + 8
    engines = {dtype: LLMEngine(loaded, build_config({
        "device": "cpu", "cpu_decode_compile": "off", "max_step_time": 0, "kv_cache_dtype": dtype,
        "max_model_len": longest, "max_num_seqs": max(seqs for seqs, _ in shapes), "num_kv_blocks": blocks,
        "max_num_batched_tokens": max(2048, longest)}, env={})) for dtype in DTYPES}
    print(f"{loaded.name}, {loaded.cpu_weights.description}; {args.rounds} rounds, the caches taking turns")
    print(f"{'seqs':>5} {'context':>8} " + " ".join(f"{d + ' ms':>12}" for d in DTYPES) + f" {'float16/float32':>16}")
    for num_seqs, context in shapes:
        seconds: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
        for round_ in range(args.rounds):
            for dtype, engine in engines.items():
                seconds[dtype].append(decode_step_seconds(engine, num_seqs, context, seed=round_))
        medians = {dtype: statistics.median(values) for dtype, values in seconds.items()}
        print(f"{num_seqs:>5} {context:>8} " + " ".join(f"{medians[d] * 1000:>12.2f}" for d in DTYPES)
              + f" {medians['float16'] / medians['float32']:>15.2f}x", flush=True)


if __name__ == "__main__":
    main()
