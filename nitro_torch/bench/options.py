"""The benchmark's command-line options and the names they choose from.

Imported by `nitro_torch.cli` when it builds its parser, so this module stays light: no torch, no transformers.
The heavy modules import their names (shapes, quantizations, systems) from here.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

NITRO = "nitro"
NITRO_FP32 = "nitro-fp32"
SERVER = "server"
REFERENCE_SYSTEM = "hf-static"
BASELINES = ("hf-static", "hf-cb")
SYSTEM_NAMES = (NITRO, NITRO_FP32, "hf-static", "hf-cb", SERVER)
"""In-process engines (`nitro-fp32`: nitro with --cpu-weights fp32, on the CPU), plus `server`: a running server
benchmarked over HTTP (`--url`)."""
WORKLOAD_NAMES = ("chat-64", "decode-b1", "w256", "host-overhead")
"""host-overhead is not a throughput workload: the engine's own host time per step (bench/host_overhead.py)."""

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 64, "intermediate_size": 1024, "vocab_size": 4096, "tie_word_embeddings": True},
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True},
    "llama-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False},
}
QUANTIZATIONS = ("none", "bnb-4bit", "bnb-8bit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of `scripts/bench.py` and `nitro-torch bench` (they are the same)."""
    p.add_argument("--workload", default="chat-64", choices=WORKLOAD_NAMES)
    p.add_argument("--systems", default=None, help=f"comma-separated, from {', '.join(SYSTEM_NAMES)} (default: the "
                   f"workload's; with --url: {SERVER})")
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests (smoke runs)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap every request's max_tokens at N (smoke runs; the workload's own lengths otherwise)")
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
        help="set OMP_WAIT_POLICY (re-executes the command): 'passive' keeps idle OpenMP threads from spinning, "
        "which matters a lot on a busy, oversubscribed CPU; 'default' leaves the environment alone",
    )
    p.add_argument("--nitro-opt", action="append", metavar="KEY=VALUE", help="extra nitro_torch config option")
    p.add_argument("--hf-cb-attn", default="sdpa", help="attn_implementation for hf-cb (sdpa or paged|eager)")
    p.add_argument("--hf-cb-page-size", type=int, default=None, help="hf-cb tokens per cache page (CPU default 256)")
    p.add_argument("--hf-cb-num-blocks", type=int, default=None,
                   help="hf-cb cache blocks (CPU default 256; on CUDA transformers sizes it by free memory)")
    p.add_argument("--hf-cb-max-batch-tokens", type=int, default=None,
                   help="hf-cb token budget per step (CPU default 2048)")
    server = p.add_argument_group(
        "running server (--url)",
        "benchmark a running OpenAI-compatible server over HTTP with the same requests: streaming, temperature 0, "
        "exactly max_tokens (ignore_eos); token-id workloads go to /v1/completions, chat workloads to "
        "/v1/chat/completions. Random token-id workloads draw ids below the --shape's vocabulary: use --shape tiny "
        "(4096 ids) for a server whose model has a smaller vocabulary than llama's.",
    )
    server.add_argument("--url", default=None, help="the server's base URL, e.g. http://127.0.0.1:3928")
    server.add_argument("--api-key", default=os.environ.get("NITRO_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $NITRO_API_KEY)")
    server.add_argument("--concurrency", type=int, default=None,
                        help="most requests in flight at once (default: all of them at once, as in-process)")
    server.add_argument("--model", default=None, help="the model name sent (default: the server's first /v1/models)")
    server.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")


def check_arguments(args: argparse.Namespace, default_repeats: int, random_init: bool) -> str | None:
    """Fill the workload-dependent defaults; an error message when the options do not fit together."""
    if args.repeats is None:
        args.repeats = default_repeats
    if args.repeats < 1:
        return "--repeats must be at least 1"
    for flag in ("limit", "max_tokens", "baseline_limit", "concurrency"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1"
    if args.shape and not random_init:
        return f"--shape applies to the random-init workloads, not {args.workload}"
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        return f"--url must start with http:// or https://, got {args.url!r}"
    if args.systems and SERVER in args.systems.split(",") and not args.url:
        return f"system {SERVER!r} needs --url"
    return None
