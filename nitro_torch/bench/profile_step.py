"""`python -m nitro_torch.bench.profile_step`: a torch.profiler look at single decode steps, to diagnose rather than
guess where a step's time goes. For each batch size (default 1 and 256): the step's wall time, the time the device
was busy with kernels inside it (on CUDA), the idle rest, whether the decode CUDA graph was replayed (graph launches
counted), and the top operators / kernels by time.

    python -m nitro_torch.bench.profile_step --shape llama-1b --seqs 1 256          # on a GPU
    python -m nitro_torch.bench.profile_step --shape tiny --seqs 1 8 --device cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from nitro_torch.bench.models import ModelSource, nitro_random_loaded_model
from nitro_torch.bench.options import SHAPES

PROMPT_TOKENS = 128
PROFILED_STEPS = 5


def decoding_engine(shape: str, device: str, num_seqs: int) -> Any:
    from nitro_torch.config import build_config
    from nitro_torch.engine.engine import LLMEngine
    from nitro_torch.runner.attention import register_paged_attention
    from nitro_torch.sampling import SamplingParams

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    source = ModelSource("", f"random-{shape}", "", dtype, device, shape)
    loaded = nitro_random_loaded_model(source, register_paged_attention())
    options = {"max_num_seqs": num_seqs, "max_num_batched_tokens": max(2048, num_seqs * PROMPT_TOKENS),
               "device": device, "num_kv_blocks": num_seqs * (PROMPT_TOKENS + 64) // 16 + num_seqs + 8}
    engine = LLMEngine(loaded, build_config(options, env={}))
    vocab = loaded.model.config.vocab_size
    rng = random.Random(0)
    for i in range(num_seqs):
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)]
        engine.add_request(f"seq-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    while any(r.num_computed_tokens < PROMPT_TOKENS for r in engine.core.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    return engine


def profile_decode(shape: str, device: str, num_seqs: int) -> dict[str, Any]:
    engine = decoding_engine(shape, device, num_seqs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            engine.step()
            if device == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - started)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / PROFILED_STEPS
    graph_launches = sum(e.count for e in events if e.key in ("cudaGraphLaunch", "cuGraphLaunch"))
    wall_ms = statistics.median(walls) * 1000
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=12, max_name_column_width=60)
    return {"num_seqs": num_seqs, "wall_ms": round(wall_ms, 3), "device_busy_ms": round(device_us / 1000, 3),
            "device_idle_ms": round(max(0.0, wall_ms - device_us / 1000), 3) if device == "cuda" else None,
            "graph_launches_per_step": graph_launches / PROFILED_STEPS, "top": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    for num_seqs in args.seqs:
        result = profile_decode(args.shape, args.device, num_seqs)
        results.append(result)
        print(f"--- {args.shape}, {num_seqs} sequences decoding, {args.device}: top operators")
        print(result["top"])
    print(f"{'seqs':>5} | {'step wall ms':>12} | {'device busy ms':>14} | {'device idle ms':>14} | graph launches/step")
    for r in results:
        idle = "-" if r["device_idle_ms"] is None else f"{r['device_idle_ms']:.3f}"
        print(f"{r['num_seqs']:>5} | {r['wall_ms']:>12.3f} | {r['device_busy_ms']:>14.3f} | {idle:>14} | "
              f"{r['graph_launches_per_step']:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": args.shape, "device": args.device,
                       "results": [{k: v for k, v in r.items() if k != "top"} for r in results]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
