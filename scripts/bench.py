#!/usr/bin/env python
"""Throughput benchmark: nitro_torch against HF baselines, measured in the same run.

    python scripts/bench.py --workload chat-64                       # all systems, 1 run each
    python scripts/bench.py --workload chat-64 --limit 16            # quick smoke run
    python scripts/bench.py --systems hf-static,hf-cb --repeats 3 --json out.json
    python scripts/bench.py --check                                  # nitro's greedy tokens vs hf-static's
    python scripts/bench.py --workload w256 --shape llama-8b --baseline-limit 64      # GPU, random init
    python scripts/bench.py --workload decode-b1 --quantization bnb-4bit              # GPU, batch-1 decode
    python scripts/bench.py --workload w256 --shape tiny --limit 8                    # CPU smoke run of w256

Each system gets the same requests (`scripts/bench_workloads.py`; the HF baselines only the first
`--baseline-limit` when given), runs them all to completion (every request generates exactly its `max_tokens`: EOS
is ignored, decoding is greedy) and reports output tokens/s = total generated tokens / wall time. Loading, engine
construction and one tiny warm-up request are not timed. Every timed run starts from fresh engine state (no prefix
cache carried over from the previous run). The device's matmul and copy ceilings are measured in the same run and
each system's tok/s is shown as a share of the roofline (`scripts/bench_roofline.py`).

Workloads and systems are registries (`WORKLOADS` here, `SYSTEMS` in bench_systems.py): a new workload is one
`Workload(...)` entry, a new system one class with `load / start / generate / stop / close`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_context import REFERENCE_SYSTEM, BenchContext, Workload
from bench_measure import benchmark, run_checks
from bench_models import (
    QUANTIZATIONS,
    SHAPES,
    ModelSource,
    load_tokenizer,
    model_config,
    quiet_transformers,
    random_source,
    resolve_device,
)
from bench_report import (
    environment,
    environment_line,
    results_table,
    rooflines,
    to_json,
)
from bench_roofline import Ceilings, ModelDims, measure_ceilings
from bench_systems import SYSTEMS
from bench_workloads import BenchRequest, chat_requests, describe, random_requests

# ---------------------------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------------------------


def resolve_default_model(args: argparse.Namespace, workload: Workload) -> ModelSource:
    """The embedded default model (SmolLM2-135M-Instruct), or `--model-path`."""
    device = resolve_device(workload.device)
    dtype = workload.dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    quantization = args.quantization or "none"
    if args.model_path:
        path = str(Path(args.model_path).resolve())
        return ModelSource(path, Path(path).name, path, dtype, device, quantization=quantization)
    try:
        from nitro_torch.models.loader import resolve_model_source

        path, name = resolve_model_source("default")
    except Exception as exc:  # noqa: BLE001 - any failure: tell the user how to point at a folder instead
        raise SystemExit(f"cannot resolve the default model ({exc}); pass --model-path /path/to/hf-folder") from None
    return ModelSource(str(path), str(name), "default", dtype, device, quantization=quantization)


def resolve_random_model(args: argparse.Namespace, workload: Workload) -> ModelSource:
    """Random-init weights of `--shape` (or the workload's default shape), or `--model-path` when given."""
    if args.model_path:
        return resolve_default_model(args, workload)
    shape = args.shape or workload.default_shape
    assert shape is not None
    return random_source(shape, resolve_device(workload.device), args.quantization or "none", args.seed,
                         args.weights_dir)


def build_chat_requests(args: argparse.Namespace, source: ModelSource) -> list[BenchRequest]:
    return chat_requests(load_tokenizer(source), num_requests=64, seed=args.seed)


def _vocab_size(source: ModelSource) -> int:
    return int(model_config(source).get_text_config().vocab_size)


def build_w256_requests(args: argparse.Namespace, source: ModelSource) -> list[BenchRequest]:
    return random_requests(_vocab_size(source), 256, (64, 512), (64, 256), seed=args.seed)


def build_decode_requests(args: argparse.Namespace, source: ModelSource) -> list[BenchRequest]:
    return random_requests(_vocab_size(source), 1, (32, 32), (128, 128), seed=args.seed)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="chat-64",
            description="64 templated chats (prompts ~30-300 tokens), max_tokens uniform 16-128, EOS ignored, "
            "greedy, all submitted at once; SmolLM2-135M-Instruct fp32 on CPU",
            resolve_model=resolve_default_model,
            build_requests=build_chat_requests,
            static_batch_size=16,
            device="cpu",
            dtype=torch.float32,
            nitro_options={"max_num_seqs": 64},
        ),
        Workload(
            name="w256",
            description="256 requests of random token ids, prompts uniform 64-512, outputs uniform 64-256, EOS "
            "ignored, greedy, all submitted at once; random-init llama shape, bf16 on CUDA (fp32 on CPU)",
            resolve_model=resolve_random_model,
            build_requests=build_w256_requests,
            static_batch_size=64,
            nitro_options={"max_num_seqs": 256, "max_num_batched_tokens": 8192},
            default_shape="llama-1b",
            default_baseline_limit=64,
        ),
        Workload(
            name="decode-b1",
            description="batch-1 decode: one stream, 32-token random prompt, 128 new tokens, EOS ignored, greedy; "
            "random-init llama shape, bf16 on CUDA (fp32 on CPU), optionally bnb-quantized",
            resolve_model=resolve_random_model,
            build_requests=build_decode_requests,
            static_batch_size=1,
            default_systems=("nitro", "hf-static"),
            bound="bandwidth",
            default_shape="llama-8b",
            default_repeats=3,
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="chat-64", choices=sorted(WORKLOADS))
    p.add_argument("--systems", default=None, help=f"comma-separated, from {', '.join(SYSTEMS)} (default: the "
                   "workload's)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests (smoke runs)")
    p.add_argument("--baseline-limit", type=int, default=None,
                   help="hf-static / hf-cb run only the first N requests (default: 64 for w256, else all); their "
                   "tok/s is over what they ran, nothing extrapolated")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per system; the median is reported (default: 3 for decode-b1, else 1)")
    p.add_argument("--seed", type=int, default=0, help="workload (and random-init weights) seed")
    p.add_argument("--model-path", default=None, help="HF folder (or .gguf) instead of the workload's default model")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random-init shape for w256 / decode-b1 (default: llama-1b / llama-8b)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="bitsandbytes weights for every system (nitro's `quantization` option, the same "
                   "BitsAndBytesConfig for HF); random-init models are saved once under --weights-dir for it")
    p.add_argument("--weights-dir", default=None, help="where random-init models are saved for quantized loading "
                   "(default: $TMPDIR/nitro_bench_weights)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the device's matmul / copy ceilings")
    p.add_argument("--check", action="store_true", help=f"compare each system's tokens with {REFERENCE_SYSTEM}'s")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument(
        "--omp-wait-policy",
        default="default",
        choices=("default", "passive", "active"),
        help="set OMP_WAIT_POLICY (re-executes the script): 'passive' keeps idle OpenMP threads from spinning, "
        "which matters a lot on a busy, oversubscribed CPU; 'default' leaves the environment alone",
    )
    p.add_argument("--nitro-opt", action="append", metavar="KEY=VALUE", help="extra nitro_torch config option")
    p.add_argument("--hf-cb-attn", default="sdpa", help="attn_implementation for hf-cb (sdpa or paged|eager)")
    p.add_argument("--hf-cb-page-size", type=int, default=None, help="hf-cb tokens per cache page (CPU default 256)")
    p.add_argument("--hf-cb-num-blocks", type=int, default=None,
                   help="hf-cb cache blocks (CPU default 256; on CUDA transformers sizes it by free memory)")
    p.add_argument("--hf-cb-max-batch-tokens", type=int, default=None,
                   help="hf-cb token budget per step (CPU default 2048)")
    args = p.parse_args(argv)
    workload = WORKLOADS[args.workload]
    if args.repeats is None:
        args.repeats = workload.default_repeats
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    for flag in ("limit", "baseline_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.shape and workload.default_shape is None:
        p.error(f"--shape applies to the random-init workloads, not {workload.name}")
    return args


def select_systems(args: argparse.Namespace, workload: Workload) -> list[str]:
    if args.systems:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
    else:
        names = list(workload.default_systems)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.check and REFERENCE_SYSTEM not in names:
        print(f"--check: adding {REFERENCE_SYSTEM} (the reference)")
        names.append(REFERENCE_SYSTEM)
    return list(dict.fromkeys(names))


def apply_omp_wait_policy(policy: str) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: re-execute this script with the variable set."""
    if policy == "default" or os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper()}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def measure_roofline_inputs(args: argparse.Namespace, source: ModelSource) -> tuple[Ceilings | None, ModelDims | None]:
    if args.no_roofline:
        return None, None
    ceilings = measure_ceilings(source.device, source.dtype)
    print(f"ceilings (measured) {ceilings.describe()}")
    try:
        dims = ModelDims.from_config(model_config(source))
    except Exception as exc:  # noqa: BLE001 - a model without llama-style dims gets no roofline, not a crash
        print(f"roofline: cannot read the model's dims ({type(exc).__name__}: {exc})")
        dims = None
    return ceilings, dims


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None:
        apply_omp_wait_policy(args.omp_wait_policy)
    quiet_transformers()
    workload = WORKLOADS[args.workload]
    names = select_systems(args, workload)
    source = workload.resolve_model(args, workload)
    requests = workload.build_requests(args, source)
    if args.limit is not None:
        requests = requests[: args.limit]
    baseline_limit = args.baseline_limit if args.baseline_limit is not None else workload.default_baseline_limit
    ctx = BenchContext(args, workload, source, requests, baseline_limit)

    env = environment()
    print(environment_line(env))
    if source.device == "cpu" and env["load_avg_1m"] > (env["logical_cpus"] or 1):
        print(
            f"warning: this machine is busy (load {env['load_avg_1m']:.1f} on {env['logical_cpus']} CPUs): absolute "
            "tok/s are unreliable; the round-robin runs keep the ratios comparable"
            + ("; consider --omp-wait-policy passive" if env["omp_wait_policy"] == "unset" else "")
        )
    print(f"workload {workload.name}: {workload.description}")
    quantized = f", {source.quantization}" if source.quantization != "none" else ""
    print(f"model {source.name} ({source.path or 'random init'}), {str(source.dtype).removeprefix('torch.')}"
          f"{quantized} on {source.device}")
    print(f"requests: {describe(requests)}")
    if baseline_limit is not None and baseline_limit < len(requests):
        print(f"baselines (hf-static, hf-cb) run the first {baseline_limit} requests only")
    print(f"systems: {', '.join(names)}; repeats {args.repeats}", flush=True)
    ceilings, dims = measure_roofline_inputs(args, source)

    results = benchmark(names, ctx, args.repeats)
    roofs = rooflines(ctx, results, dims, ceilings)
    print()
    print(results_table(results, args.repeats, roofs))
    checks = run_checks(results, requests) if args.check else []
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(ctx, env, results, checks, roofs, ceilings), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
