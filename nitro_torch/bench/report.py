"""What a benchmark run prints and writes: the environment, the results table (tok/s, ratios to each baseline,
roofline share) and the JSON document."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nitro_torch.bench.context import BASELINES, NITRO, SERVER, BenchContext
from nitro_torch.bench.measure import CheckResult, SystemResult, load_avg
from nitro_torch.bench.roofline import (
    Ceilings,
    ModelDims,
    Roofline,
    bandwidth_roofline,
    compute_roofline,
)


def environment() -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_avg_1m": load_avg(),
        "cpu_pressure_avg60": _cpu_pressure(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_pressure() -> float | None:
    """Share of the last minute in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def environment_line(env: dict[str, Any]) -> str:
    parts = [
        f"torch {env['torch']}",
        f"transformers {env['transformers']}",
        f"threads {env['threads']} (interop {env['interop_threads']}, OMP_WAIT_POLICY {env['omp_wait_policy']})",
        f"CPU {env['cpu']} x{env['logical_cpus']}",
    ]
    if env.get("gpu"):
        parts.append(f"GPU {env['gpu']}")
    parts.append(f"load avg {env['load_avg_1m']:.2f}")
    if env.get("cpu_pressure_avg60") is not None:
        parts.append(f"CPU pressure {env['cpu_pressure_avg60']:.0f}%")
    return "env: " + " | ".join(parts)


def rooflines(ctx: BenchContext, results: dict[str, SystemResult], dims: ModelDims | None,
              ceilings: Ceilings | None) -> dict[str, Roofline]:
    """Per system, over the requests it ran (and, for the bandwidth bound, the weights it loaded)."""
    if dims is None or ceilings is None:
        return {}
    out: dict[str, Roofline] = {}
    kv_elem_bytes = torch.empty(0, dtype=ctx.source.dtype).element_size()
    for name in results:
        if name == SERVER:
            continue  # the ceilings are this machine's, not the server's
        requests = ctx.requests_for(name)
        if ctx.workload.bound == "compute":
            out[name] = compute_roofline(dims, requests, ceilings)
        elif name in ctx.weight_bytes:
            out[name] = bandwidth_roofline(dims, requests, ctx.weight_bytes[name], kv_elem_bytes, ceilings)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def results_table(results: dict[str, SystemResult], repeats: int, roofs: dict[str, Roofline]) -> str:
    baselines = [b for b in BASELINES if b in results]
    label = "median tok/s" if repeats > 1 else "tok/s"
    head = f"{'system':<10} {'requests':>8} {label:>13} {'runs (tok/s)':<24}"
    head += "".join(f" {'x ' + b:>12}" for b in baselines) + f" {'roofline share':>28}"
    rows = [head]
    for name, res in results.items():
        if res.skipped is not None:
            rows.append(f"{name:<10} {res.num_requests:>8} {'skipped':>13}")
            continue
        tps = res.median_tok_s or 0.0
        runs = ", ".join(f"{r.tok_s:.1f}" for r in res.runs)
        row = f"{name:<10} {res.num_requests:>8} {tps:>13.1f} {runs:<24}"
        for b in baselines:
            ratio = _ratio(tps, results[b].median_tok_s)
            row += f" {f'{ratio:.2f}x' if ratio else 'n/a':>12}"
        roof = roofs.get(name)
        share = f"{tps / roof.ceiling_tok_s:.2%} of {roof.ceiling_tok_s:,.0f}" if roof and tps else "n/a"
        rows.append(row + f" {share:>28}")
    for name, roof in roofs.items():
        if results[name].skipped is None:
            rows.append(f"roofline [{name}]: {roof.bound} bound {roof.ceiling_tok_s:,.0f} tok/s ({roof.detail})")
    return "\n".join(rows)


def to_json(ctx: BenchContext, env: dict[str, Any], results: dict[str, SystemResult], checks: list[CheckResult],
            roofs: dict[str, Roofline], ceilings: Ceilings | None) -> dict[str, Any]:
    nitro_tps = results[NITRO].median_tok_s if NITRO in results else None
    systems = {}
    for name, res in results.items():
        tps = res.median_tok_s
        roof = roofs.get(name)
        systems[name] = {
            "skipped": res.skipped,
            "notes": res.notes,
            "num_requests": res.num_requests,
            "runs": [{**asdict(r), "tok_s": r.tok_s} for r in res.runs],
            "median_tok_s": tps,
            "nitro_ratio": _ratio(nitro_tps, tps),
            "vs_baselines": {b: _ratio(tps, results[b].median_tok_s) for b in BASELINES if b in results},
            "roofline": {**asdict(roof), "share": _ratio(tps, roof.ceiling_tok_s)} if roof else None,
            "weight_bytes": ctx.weight_bytes.get(name),
            "latency": res.median_latency,
        }
    source = ctx.source
    return {
        "workload": ctx.workload.name,
        "description": ctx.workload.description,
        "model": {"path": source.path, "name": source.name, "dtype": str(source.dtype), "device": source.device,
                  "shape": source.shape, "quantization": source.quantization},
        "requests": {
            "count": len(ctx.requests),
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in ctx.requests),
            "max_tokens": sum(r.max_tokens for r in ctx.requests),
            "seed": ctx.args.seed,
            "baseline_limit": ctx.baseline_limit,
        },
        "server": {"url": ctx.args.url, "model": ctx.server_model} if getattr(ctx.args, "url", None) else None,
        "environment": env,
        "ceilings": asdict(ceilings) if ceilings else None,
        "systems": systems,
        "checks": [asdict(c) for c in checks],
    }
