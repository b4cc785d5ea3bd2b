"""The embedded model's packed CPU weights with their float32 paths for many rows (the tied LM head on its float32
embedding from 16 rows, models/tied_head.py; layers unpacked to float32 from 128 rows, models/int4_dequant.py)
against the packed kernels for every step, in one process, the two taking turns for `--rounds` rounds:

- decode steps of SEQS requests after CONTEXT-token prompts (`--decode`), the variants taking turns step by step,
  median step time;
- prefill of SEQS prompts of CONTEXT tokens (`--prefill`), seconds until every first token;
- the LM head alone on as many rows as the decode shapes have (medians of 20 calls).

    .venv/bin/python scripts/bench_cpu_unpacked.py --decode 16x200 32x200 64x200 --prefill 1x1000 8x300
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.models.packed_linear import UNPACKED_MIN_ROWS, Int4Linear, Int8Linear
from nitro_torch.models.tied_head import FLOAT_MIN_ROWS, TiedPackedHead
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

STEPS = 12
VARIANTS = {"packed kernels": (sys.maxsize, sys.maxsize), "float32 for many rows": (FLOAT_MIN_ROWS, UNPACKED_MIN_ROWS)}
"""Per variant: from how many rows the tied head, and the packed layers, run in float32."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", nargs="*", default=["16x200", "32x200", "64x200"], help="SEQSxCONTEXT")
    parser.add_argument("--prefill", nargs="*", default=["1x1000", "8x300"], help="SEQSxCONTEXT")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    decode, prefill = ([tuple(int(n) for n in shape.split("x")) for shape in shapes]
                       for shapes in (args.decode, args.prefill))
    model_options = build_config({"model": "default", "device": "cpu", "cpu_weights": "auto"}, env={}).model
    loaded = load_model(model_options, attn_implementation=register_paged_attention())
    head = loaded.model.lm_head
    if not isinstance(head, TiedPackedHead):
        raise SystemExit(f"{loaded.name}'s head is {type(head).__name__}, not a tied packed head")
    shapes = decode + prefill
    longest = max(context for _, context in shapes) + STEPS + 8
    # the variants' turns repeat their prompts: no prefix cache, so each computes them
    engine = LLMEngine(loaded, build_config({
        "device": "cpu", "cpu_decode_compile": "off", "max_step_time": 0, "prefix_caching": False,
        "max_model_len": longest, "max_num_seqs": max(seqs for seqs, _ in shapes),
        "max_num_batched_tokens": max(2048, longest),
        "num_kv_blocks": max(seqs * -(-longest // 16) for seqs, _ in shapes) + 8}, env={}))

    def use(variant: str) -> None:
        head.min_rows, Int4Linear.min_unpacked_rows = VARIANTS[variant]
        Int8Linear.min_unpacked_rows = Int4Linear.min_unpacked_rows

    for name in VARIANTS:  # a first step of each kind, untimed
        use(name)
        prefill_seconds(engine, 2, 200, seed=-1)
    print(f"{loaded.name}, {loaded.cpu_weights.description}; {args.rounds} rounds, the variants taking turns")
    names = " ".join(f"{name:>22}" for name in VARIANTS)
    if decode:
        print(f"{'decode step ms':<16} {'seqs':>5} {'context':>8} {names} {'ratio':>7}")
    for num_seqs, context in decode:
        medians = decode_step_seconds(engine, use, num_seqs, context, STEPS * args.rounds)
        print(_row(f"{'':<16} {num_seqs:>5} {context:>8}", medians), flush=True)
    if prefill:
        print(f"{'prefill ms':<16} {'seqs':>5} {'context':>8} {names} {'ratio':>7}")
    for num_seqs, context in prefill:
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for round_ in range(args.rounds):
            for name, times in seconds.items():
                use(name)
                times.append(prefill_seconds(engine, num_seqs, context, seed=round_))
        print(_row(f"{'':<16} {num_seqs:>5} {context:>8}", [statistics.median(t) for t in seconds.values()]),
              flush=True)
    for rows in sorted({seqs for seqs, _ in decode}):
        print(_row(f"{'LM head alone ms':<16} {rows:>5} {'':>8}", head_seconds(head, use, rows)), flush=True)
    use("float32 for many rows")


def _row(label: str, medians: list[float]) -> str:
    baseline, new = medians
    return f"{label} " + " ".join(f"{m * 1000:>22.2f}" for m in medians) + f" {new / baseline:>6.2f}x"


def decode_step_seconds(engine: LLMEngine, use: Callable[[str], None], num_seqs: int, context: int, steps: int
                        ) -> list[float]:
    """Median seconds of a decode step of `num_seqs` requests after `context`-token prompts, per variant, the
    variants taking turns step by step (`steps` each)."""
    rng = random.Random(context)
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 2, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"d{num_seqs}-{i}", [rng.randrange(1000, 40000) for _ in range(context)], params)
    while any(request.num_computed_tokens < context for request in engine.core.requests.values()):
        engine.step()
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(steps):
        for name, times in seconds.items():
            use(name)
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
    while engine.has_unfinished_requests:
        engine.step()
    return [statistics.median(times) for times in seconds.values()]


def prefill_seconds(engine: LLMEngine, num_seqs: int, context: int, seed: int) -> float:
    """Seconds from adding `num_seqs` prompts of `context` random tokens to every first token."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"p{seed}-{i}", [rng.randrange(1000, 40000) for _ in range(context)], params)
    started = time.perf_counter()
    while engine.has_unfinished_requests:
        engine.step()
    return time.perf_counter() - started


@torch.inference_mode()
def head_seconds(head: TiedPackedHead, use: Callable[[str], None], rows: int, calls: int = 20) -> list[float]:
    """Median seconds of one call of the head on `rows` rows, per variant, the variants taking turns."""
    x = torch.randn(rows, head.float_weight.shape[1], generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(calls):
        for name, times in seconds.items():
            use(name)
            started = time.perf_counter()
            head(x)
            times.append(time.perf_counter() - started)
    return [statistics.median(times) for times in seconds.values()]


if __name__ == "__main__":
    main()
