"""Throughput benchmark: nitro_torch against HF baselines, measured in the same run; or a running server over HTTP.

    nitro-torch bench --workload chat-64                             # all systems, 1 run each
    nitro-torch bench --workload chat-64 --limit 16                  # quick smoke run
    nitro-torch bench --systems hf-static,hf-cb --repeats 3 --json out.json
    nitro-torch bench --check                                        # nitro's greedy tokens vs hf-static's
    nitro-torch bench --workload w256 --shape llama-8b --baseline-limit 64        # GPU, random init
    nitro-torch bench --workload decode-b1 --quantization bnb-4bit                # GPU, batch-1 decode
    nitro-torch bench --workload w256 --shape tiny --limit 8                      # CPU smoke run of w256
    nitro-torch bench --url http://127.0.0.1:3928 --workload chat-64             # a running server over HTTP
    nitro-torch bench --url http://127.0.0.1:3928 --workload w256 --shape tiny --concurrency 32

(`python scripts/bench.py ...` takes the same options.)

Each system gets the same requests (`nitro_torch/bench/workloads.py`; the HF baselines only the first
`--baseline-limit` when given), runs them all to completion (every request generates exactly its `max_tokens`: EOS
is ignored, decoding is greedy) and reports output tokens/s = total generated tokens / wall time. Loading, engine
construction and one tiny warm-up request are not timed. Every timed run starts from fresh engine state (no prefix
cache carried over from the previous run). The device's matmul and copy ceilings are measured in the same run and
each system's tok/s is shown as a share of the roofline (`nitro_torch/bench/roofline.py`).

With `--url`, the system `server` sends the same requests to a running server as streaming HTTP requests
(`nitro_torch/bench/http_system.py`) and adds TTFT, inter-token and end-to-end latencies; it runs alone unless
`--systems` names in-process systems too (ratios are then to those, run on this machine).

Workloads and systems are registries (`WORKLOADS` here, `SYSTEMS` in systems.py): a new workload is one
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

from nitro_torch.bench.context import BASELINES, REFERENCE_SYSTEM, SERVER, BenchContext, Workload
from nitro_torch.bench.http_system import latency_table
from nitro_torch.bench.measure import SystemResult, benchmark, run_checks
from nitro_torch.bench.models import (
    ModelSource,
    load_tokenizer,
    model_config,
    quiet_transformers,
    random_source,
    resolve_device,
)
from nitro_torch.bench.options import SYSTEM_NAMES, WORKLOAD_NAMES, add_arguments, check_arguments
from nitro_torch.bench.report import (
    environment,
    environment_line,
    results_table,
    rooflines,
    to_json,
)
from nitro_torch.bench.roofline import Ceilings, ModelDims, measure_ceilings
from nitro_torch.bench.workloads import BenchRequest, chat_requests, describe, random_requests

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


DECODE_CHATS = 4
DECODE_TOKENS = 128


def resolve_decode_model(args: argparse.Namespace, workload: Workload) -> ModelSource:
    """On a CPU, the embedded model (what a single user of `scripts/serve` gets); on a GPU, or with --shape, the
    random-init shape."""
    if args.model_path or (not args.shape and resolve_device(workload.device) == "cpu"):
        return resolve_default_model(args, workload)
    return resolve_random_model(args, workload)


def build_decode_requests(args: argparse.Namespace, source: ModelSource) -> list[BenchRequest]:
    """The first chats of chat-64, each to 128 tokens, for a real model; one random 32-token prompt otherwise."""
    if source.built_in_memory or source.shape:
        return random_requests(_vocab_size(source), 1, (32, 32), (DECODE_TOKENS, DECODE_TOKENS), seed=args.seed)
    chats = chat_requests(load_tokenizer(source), num_requests=DECODE_CHATS, seed=args.seed)
    return [chat._replace(max_tokens=DECODE_TOKENS) for chat in chats]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="chat-64",
            description="64 templated chats (prompts ~30-300 tokens), max_tokens uniform 16-128, EOS ignored, "
            "greedy, all submitted at once; SmolLM2-135M-Instruct on CPU: the HF baselines and nitro-fp32 in "
            "fp32, nitro with the server's default CPU weights (int4 for the default GGUF file)",
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
            description="batch-1 decode, one request after the other, 128 new tokens each, EOS ignored, greedy: on "
            "a CPU the first 4 chats of chat-64 on the embedded model (its GGUF weights: nitro packed, nitro-fp32 "
            "and HF float32); on CUDA one 32-token random prompt on a random-init llama shape (bf16, optionally "
            "bnb-quantized)",
            resolve_model=resolve_decode_model,
            build_requests=build_decode_requests,
            static_batch_size=1,
            default_systems=("nitro", "nitro-fp32", "hf-static"),
            bound="bandwidth",
            default_shape="llama-8b",
            default_repeats=3,
            one_at_a_time=True,
            nitro_options={"cpu_decode_compile": "startup"},
        ),
    )
}


assert set(WORKLOADS) | {"host-overhead"} == set(WORKLOAD_NAMES), "options.WORKLOAD_NAMES lists the workloads"


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> str | None:
    """Fill the workload's defaults into `args`; an error message when the options do not fit together."""
    if args.workload == "host-overhead":
        return None if args.url is None else "--workload host-overhead runs in-process, not against --url"
    workload = WORKLOADS[args.workload]
    return check_arguments(args, workload.default_repeats, workload.default_shape is not None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    error = check_args(args)
    if error:
        p.error(error)
    return args


def select_systems(args: argparse.Namespace, workload: Workload) -> list[str]:
    if args.systems:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
    elif args.url:
        names = [SERVER]
    else:
        names = list(workload.default_systems)
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEM_NAMES)}")
    if args.check and REFERENCE_SYSTEM not in names:
        print(f"--check: adding {REFERENCE_SYSTEM} (the reference)")
        names.append(REFERENCE_SYSTEM)
    return list(dict.fromkeys(names))


def apply_omp_wait_policy(policy: str, argv: Sequence[str]) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: re-execute `python *argv` with the variable set."""
    if policy == "default" or os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper()}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


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


def run(args: argparse.Namespace, reexec_argv: Sequence[str] | None = None) -> int:
    """The benchmark, for options already checked (`check_args`). `reexec_argv`: the arguments to `python` that
    re-run this command (for --omp-wait-policy); None: never re-execute. Returns the exit status: 1 when the
    `server` system failed or had failed requests, else 0."""
    if reexec_argv is not None:
        apply_omp_wait_policy(args.omp_wait_policy, reexec_argv)
    quiet_transformers()
    if args.workload == "host-overhead":
        from nitro_torch.bench.host_overhead import run_host_overhead

        return run_host_overhead(args)
    workload = WORKLOADS[args.workload]
    names = select_systems(args, workload)
    in_process = [n for n in names if n != SERVER]
    if not in_process:
        args.no_roofline = True  # the ceilings would be this machine's, not the server's
    source = workload.resolve_model(args, workload)
    requests = workload.build_requests(args, source)
    if args.limit is not None:
        requests = requests[: args.limit]
    if args.max_tokens is not None:
        requests = [r._replace(max_tokens=min(r.max_tokens, args.max_tokens)) for r in requests]
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
    if in_process:
        print(f"model {source.name} ({source.path or 'random init'}), {str(source.dtype).removeprefix('torch.')}"
              f"{quantized} on {source.device}")
    if SERVER in names:
        print(f"server {args.url}: {'chat requests (messages)' if requests[0].messages else 'token-id prompts'}; "
              "prompt token counts below are this machine's tokenization")
    print(f"requests: {describe(requests)}")
    if baseline_limit is not None and baseline_limit < len(requests) and set(names) & set(BASELINES):
        print(f"baselines (hf-static, hf-cb) run the first {baseline_limit} requests only")
    print(f"systems: {', '.join(names)}; repeats {args.repeats}", flush=True)
    ceilings, dims = measure_roofline_inputs(args, source)

    results = benchmark(names, ctx, args.repeats)
    roofs = rooflines(ctx, results, dims, ceilings)
    print()
    print(results_table(results, args.repeats, roofs))
    if workload.one_at_a_time:
        print(per_token_line(results))
    latencies = {name: res.median_latency for name, res in results.items() if res.median_latency}
    if latencies:
        print()
        print(latency_table(latencies))
    if SERVER in results and not set(results) & set(BASELINES):
        print(f"no baseline in this run: {SERVER} is measured alone (add in-process systems to --systems, e.g. "
              f"--systems {SERVER},hf-static, to compare on this machine)")
    checks = run_checks(results, requests) if args.check else []
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(ctx, env, results, checks, roofs, ceilings), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if SERVER in results and server_failed(results[SERVER]) else 0


def per_token_line(results: dict[str, SystemResult]) -> str:
    """One request at a time, a system's time per output token is 1 / its tok/s (prefill included)."""
    shown = [f"{name} {1000 / tok_s:.1f} ms" for name, res in results.items() if (tok_s := res.median_tok_s)]
    return "time per output token (1 / tok/s, prefill included): " + ", ".join(shown)


def server_failed(result: SystemResult) -> bool:
    if result.skipped is not None:
        return True
    return any(r.latency and r.latency["errors"] for r in result.runs)


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/bench.py."""
    from nitro_torch.bench.command import preflight

    args = parse_args(argv)
    status = preflight(args)
    if status is not None:
        return status
    return run(args, reexec_argv=sys.argv if argv is None else None)


if __name__ == "__main__":
    raise SystemExit(main())
