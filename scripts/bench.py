#!/usr/bin/env python
"""Throughput benchmark: nitro_torch against HF baselines, measured in the same run.

    python scripts/bench.py --workload chat-64                       # all systems, 1 run each
    python scripts/bench.py --workload chat-64 --limit 16            # quick smoke run
    python scripts/bench.py --systems hf-static,hf-cb --repeats 3 --json out.json
    python scripts/bench.py --check                                  # nitro's greedy tokens vs hf-static's

Each system gets the same requests (`scripts/bench_workloads.py`), runs them all to completion (every
request generates exactly its `max_tokens`: EOS is ignored, decoding is greedy) and reports output tokens/s =
total generated tokens / wall time. Loading, engine construction and one tiny warm-up request are not timed.
Every timed run starts from fresh engine state (no prefix cache carried over from the previous run).

Workloads and systems are registries (`WORKLOADS`, `SYSTEMS`): a new workload is one `Workload(...)` entry,
a new system one class with `load / start / generate / stop / close`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_workloads import BenchRequest, chat_requests, describe  # noqa: E402

Outputs = list[list[int]]
REFERENCE_SYSTEM = "hf-static"
NITRO = "nitro"


# ---------------------------------------------------------------------------------------------------------------
# models and workloads
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, for the HF baselines (`path`) and for nitro_torch (`nitro_model`)."""

    path: str
    """An HF folder, or a .gguf file (loaded with transformers' GGUF reader: slow)."""
    name: str
    nitro_model: str
    """The value of nitro_torch's `model` option that loads the same weights."""
    dtype: torch.dtype
    device: str


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    device: str
    dtype: torch.dtype
    resolve_model: Callable[[argparse.Namespace, "Workload"], ModelSource]
    build_requests: Callable[[argparse.Namespace, ModelSource], list[BenchRequest]]
    static_batch_size: int
    """Batch size of the `hf-static` baseline."""
    nitro_options: dict[str, Any] = field(default_factory=dict)
    """Extra nitro_torch config options (build_config keys)."""
    default_systems: tuple[str, ...] = ("nitro", "hf-static", "hf-cb")


def resolve_default_model(args: argparse.Namespace, workload: Workload) -> ModelSource:
    """The embedded default model (SmolLM2-135M-Instruct), or `--model-path`."""
    if args.model_path:
        path = str(Path(args.model_path).resolve())
        return ModelSource(path, Path(path).name, path, workload.dtype, workload.device)
    try:
        from nitro_torch.models.loader import resolve_model_source
    except ImportError as exc:
        raise SystemExit(
            f"cannot resolve the default model ({exc}); pass --model-path /path/to/hf-folder"
        ) from None
    try:
        path, name = resolve_model_source("default")
    except Exception as exc:  # noqa: BLE001 - any failure: tell the user how to point at a folder instead
        raise SystemExit(f"cannot resolve the default model ({exc}); pass --model-path /path/to/hf-folder") from None
    return ModelSource(str(path), str(name), "default", workload.dtype, workload.device)


def build_chat_requests(args: argparse.Namespace, source: ModelSource) -> list[BenchRequest]:
    return chat_requests(load_tokenizer(source), num_requests=64, seed=args.seed)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="chat-64",
            description="64 templated chats (prompts ~30-300 tokens), max_tokens uniform 16-128, EOS ignored, "
            "greedy, all submitted at once; SmolLM2-135M-Instruct fp32 on CPU",
            device="cpu",
            dtype=torch.float32,
            resolve_model=resolve_default_model,
            build_requests=build_chat_requests,
            static_batch_size=16,
            nitro_options={"max_num_seqs": 64},
        ),
        # "w256" (GPU, random-init llama shapes) and "decode-b1" (GPU, batch-1 decode) go here.
    )
}


# ---------------------------------------------------------------------------------------------------------------
# HF loading helpers
# ---------------------------------------------------------------------------------------------------------------


def _hf_location(path: str) -> tuple[str, dict[str, Any]]:
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    folder, extra = _hf_location(source.path)
    return AutoTokenizer.from_pretrained(folder, **extra)


def load_hf_model(source: ModelSource, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    folder, extra = _hf_location(source.path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=source.dtype, attn_implementation=attn_implementation, **extra
    )
    return model.to(source.device).eval()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    args: argparse.Namespace
    workload: Workload
    source: ModelSource
    requests: list[BenchRequest]


class System:
    """One engine under test. `load` once (untimed), then per timed run: `start` (untimed: fresh engine state and
    a tiny warm-up request), `generate` (timed), `stop`. `close` at the end."""

    name: ClassVar[str]
    notes: list[str]

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.notes = []

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        """Why this system cannot run here (it is then skipped), or None."""
        return None

    def load(self) -> None: ...

    def start(self) -> None: ...

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        raise NotImplementedError

    def stop(self) -> None: ...

    def close(self) -> None: ...

    def warmup(self) -> None:
        first = self.ctx.requests[0]
        self.generate([BenchRequest(first.prompt_token_ids[:8], 4)])


class HFStatic(System):
    """HF `model.generate` over static batches (left padding), in request order. Each batch runs to its largest
    `max_tokens`; only each request's own `max_tokens` count (the padding overshoot is not useful output)."""

    name = "hf-static"

    def load(self) -> None:
        self.model = load_hf_model(self.ctx.source)
        gen = self.model.generation_config
        self.pad_id = _pad_token_id(gen)
        # EOS ignored without suppressing it (as ignore_eos does): no EOS id means no EOS stopping criterion.
        # (`min_new_tokens` would mask the EOS logit instead and change the greedy tokens.)
        gen.eos_token_id = None
        gen.pad_token_id = self.pad_id

    def start(self) -> None:
        self.warmup()

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        outputs: Outputs = []
        size = self.ctx.workload.static_batch_size
        for i in range(0, len(requests), size):
            outputs.extend(self._generate_batch(requests[i : i + size]))
        return outputs

    def _generate_batch(self, batch: Sequence[BenchRequest]) -> Outputs:
        input_ids, attention_mask = left_pad([r.prompt_token_ids for r in batch], self.pad_id)
        device = self.ctx.source.device
        longest = max(r.max_tokens for r in batch)
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=longest,
            do_sample=False,
        )
        new = out[:, input_ids.shape[1] :].tolist()
        return [tokens[: r.max_tokens] for tokens, r in zip(new, batch)]

    def close(self) -> None:
        del self.model


def _pad_token_id(gen: Any) -> int:
    for candidate in (gen.pad_token_id, gen.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


class HFContinuousBatching(System):
    """transformers' own continuous batching (paged cache, background thread): `add_request(ids,
    max_new_tokens=n, eos_token_id=-1)` per request (-1: no EOS ids, so requests run to max_new_tokens)."""

    name = "hf-cb"

    def load(self) -> None:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        args = self.ctx.args
        self.model = load_hf_model(self.ctx.source, attn_implementation=args.hf_cb_attn)
        self.generation_config = copy.deepcopy(self.model.generation_config)
        self.generation_config.do_sample = False
        requests = self.ctx.requests
        self.hints = WorkloadHints(
            max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
            max_generated_length=max(r.max_tokens for r in requests),
            num_requests=len(requests),
        )
        self.notes.append(
            f"attn={args.hf_cb_attn} page_size={args.hf_cb_page_size} num_blocks={args.hf_cb_num_blocks} "
            f"max_batch_tokens={args.hf_cb_max_batch_tokens}; EOS ignored per request (eos_token_id=-1)"
        )
        self._serial = 0

    def start(self) -> None:
        from transformers import ContinuousBatchingConfig

        args = self.ctx.args
        cb_config = ContinuousBatchingConfig(
            page_size=args.hf_cb_page_size,
            num_blocks=args.hf_cb_num_blocks,
            max_batch_tokens=args.hf_cb_max_batch_tokens,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=self.generation_config,
            continuous_batching_config=cb_config,
            workload_hints=self.hints,
        )
        with torch.inference_mode():
            self.manager.start()
        self.warmup()

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        manager = self.manager
        ids = []
        for r in requests:
            self._serial += 1
            ids.append(f"bench-{self._serial}")
            manager.add_request(r.prompt_token_ids, request_id=ids[-1], max_new_tokens=r.max_tokens, eos_token_id=-1)
        finished: dict[str, Any] = {}
        while len(finished) < len(ids):
            result = manager.get_result(timeout=1.0)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("hf-cb: the generation thread stopped before all requests finished")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"hf-cb: request {result.request_id} failed: {result.error}")
                finished[result.request_id] = result
        return [list(finished[i].generated_tokens) for i in ids]

    def stop(self) -> None:
        self.manager.stop(block=True)
        self.manager.destroy()
        del self.manager

    def close(self) -> None:
        del self.model


class Nitro(System):
    """nitro_torch's offline engine: `LLMEngine.from_config(...)` then blocking `engine.generate(prompts, params)`."""

    name = NITRO

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        try:
            from nitro_torch.engine.engine import LLMEngine
        except Exception as exc:  # noqa: BLE001 - the engine is being written; any import failure means "not yet"
            return f"nitro_torch.engine.engine.LLMEngine cannot be imported yet ({type(exc).__name__}: {exc})"
        missing = [m for m in ("from_config", "generate") if not hasattr(LLMEngine, m)]
        if missing:
            return f"LLMEngine has no {' / '.join(missing)} yet"
        return None

    def config_options(self) -> dict[str, Any]:
        ctx = self.ctx
        options: dict[str, Any] = {
            "model": ctx.source.nitro_model,
            "device": ctx.source.device,
            "dtype": str(ctx.source.dtype).removeprefix("torch."),
        }
        options.update(ctx.workload.nitro_options)
        options.update(parse_key_values(ctx.args.nitro_opt))
        return options

    def start(self) -> None:
        from nitro_torch.config import build_config
        from nitro_torch.engine.engine import LLMEngine

        options = self.config_options()
        if not self.notes:
            self.notes.append("options: " + " ".join(f"{k}={v}" for k, v in options.items()))
        self.engine = LLMEngine.from_config(build_config(options, env={}))
        self.warmup()

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        from nitro_torch.sampling import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        return [list(out) for out in self.engine.generate([list(r.prompt_token_ids) for r in requests], params)]

    def stop(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None) or getattr(self.engine, "close", None)
        if callable(shutdown):
            shutdown()
        del self.engine


SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (Nitro, HFStatic, HFContinuousBatching)}


def parse_key_values(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--nitro-opt expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    tokens: int
    load_avg_1m: float = float("nan")
    """1-minute load average when the run started (this machine is shared: a high value means contention)."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class SystemResult:
    name: str
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    outputs: Outputs | None = None

    @property
    def median_tok_s(self) -> float | None:
        return statistics.median(r.tok_s for r in self.runs) if self.runs else None


def count_tokens(outputs: Outputs, requests: Sequence[BenchRequest]) -> tuple[int, int]:
    """(useful generated tokens: each request's output up to its own max_tokens, requests that came up short)."""
    if len(outputs) != len(requests):
        raise RuntimeError(f"got {len(outputs)} outputs for {len(requests)} requests")
    useful = [min(len(o), r.max_tokens) for o, r in zip(outputs, requests)]
    short = sum(u < r.max_tokens for u, r in zip(useful, requests))
    return sum(useful), short


def benchmark(names: Sequence[str], ctx: BenchContext, repeats: int) -> dict[str, SystemResult]:
    """Load every system, then time them round-robin (repeat 1 of each, then repeat 2 of each, ...) so that a
    change in background load during the run hits all systems alike. A system that fails is reported and dropped."""
    results = {name: SystemResult(name) for name in names}
    systems: dict[str, System] = {}
    try:
        for name in names:
            system = _load(SYSTEMS[name], ctx, results[name])
            if system is not None:
                systems[name] = system
        for i in range(repeats):
            for name, system in list(systems.items()):
                if not _run_once(system, ctx, results[name], f"run {i + 1}/{repeats}"):
                    systems.pop(name).close()
    finally:
        for system in systems.values():
            system.close()
    for name, result in results.items():
        for note in result.notes:
            print(f"[{name}] {note}")
    return results


def _load(cls: type[System], ctx: BenchContext, result: SystemResult) -> System | None:
    reason = cls.unavailable(ctx)
    if reason is not None:
        result.skipped = reason
        print(f"[{cls.name}] skipped: {reason}", flush=True)
        return None
    system = cls(ctx)
    result.notes = system.notes
    t0 = time.perf_counter()
    try:
        system.load()
    except Exception as exc:  # noqa: BLE001 - report and go on with the other systems
        _fail(result, "load", exc)
        return None
    print(f"[{cls.name}] loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return system


def _run_once(system: System, ctx: BenchContext, result: SystemResult, label: str) -> bool:
    """start (untimed) -> generate (timed) -> stop; False when it failed."""
    try:
        system.start()
        load = _load_avg()
        t0 = time.perf_counter()
        outputs = system.generate(ctx.requests)
        wall = time.perf_counter() - t0
        system.stop()
        tokens, short = count_tokens(outputs, ctx.requests)
    except Exception as exc:  # noqa: BLE001
        _fail(result, label, exc)
        return False
    if short:
        note = f"{short} requests produced fewer than max_tokens (EOS not ignored?): counted what was produced"
        if note not in result.notes:
            result.notes.append(note)
    run = Run(wall, tokens, load)
    result.runs.append(run)
    result.outputs = outputs
    print(
        f"[{result.name}] {label}: {run.tokens} tokens in {run.wall_s:.2f} s -> {run.tok_s:.1f} tok/s"
        f" (load avg {load:.1f})",
        flush=True,
    )
    return True


def _fail(result: SystemResult, stage: str, exc: Exception) -> None:
    traceback.print_exc()
    result.skipped = f"failed in {stage}: {type(exc).__name__}: {exc}"
    print(f"[{result.name}] {result.skipped}", flush=True)


def _load_avg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# correctness cross-check
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    system: str
    reference: str
    identical: int
    total: int
    first_divergence: list[int]
    """Per request: index of the first differing token, or -1 when identical."""


def compare_outputs(name: str, outputs: Outputs, ref_name: str, ref: Outputs, requests: Sequence[BenchRequest]) -> CheckResult:
    divergence = []
    for out, expected, r in zip(outputs, ref, requests):
        a, b = out[: r.max_tokens], expected[: r.max_tokens]
        diff = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), -1)
        if diff < 0 and len(a) != len(b):
            diff = min(len(a), len(b))
        divergence.append(diff)
    identical = sum(d < 0 for d in divergence)
    return CheckResult(name, ref_name, identical, len(requests), divergence)


def run_checks(results: dict[str, SystemResult], requests: Sequence[BenchRequest]) -> list[CheckResult]:
    ref = results.get(REFERENCE_SYSTEM)
    if ref is None or ref.outputs is None:
        print(f"check: no {REFERENCE_SYSTEM} outputs to compare against")
        return []
    checks = []
    for name, res in results.items():
        if name == REFERENCE_SYSTEM:
            continue
        if res.outputs is None:
            print(f"check: {name} has no outputs ({res.skipped or 'not run'})")
            continue
        check = compare_outputs(name, res.outputs, REFERENCE_SYSTEM, ref.outputs, requests)
        diverged = [d for d in check.first_divergence if d >= 0]
        detail = f"; diverging requests split at token {sorted(diverged)}" if diverged else ""
        print(f"check: {name} vs {REFERENCE_SYSTEM}: {check.identical}/{check.total} requests identical{detail}")
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------


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
        "load_avg_1m": _load_avg(),
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


def results_table(results: dict[str, SystemResult], repeats: int) -> str:
    nitro = results.get(NITRO)
    nitro_tps = nitro.median_tok_s if nitro else None
    label = "median tok/s" if repeats > 1 else "tok/s"
    rows = [f"{'system':<10} {label:>13} {'runs (tok/s)':<28} {'nitro / system':>14}"]
    for name, res in results.items():
        if res.skipped is not None:
            rows.append(f"{name:<10} {'skipped':>13}")
            continue
        tps = res.median_tok_s or 0.0
        runs = ", ".join(f"{r.tok_s:.1f}" for r in res.runs)
        ratio = f"{nitro_tps / tps:.2f}x" if nitro_tps and tps else "n/a"
        rows.append(f"{name:<10} {tps:>13.1f} {runs:<28} {ratio:>14}")
    return "\n".join(rows)


def to_json(ctx: BenchContext, env: dict[str, Any], results: dict[str, SystemResult], checks: list[CheckResult]) -> dict[str, Any]:
    nitro_tps = results[NITRO].median_tok_s if NITRO in results else None
    systems = {}
    for name, res in results.items():
        tps = res.median_tok_s
        systems[name] = {
            "skipped": res.skipped,
            "notes": res.notes,
            "runs": [{**asdict(r), "tok_s": r.tok_s} for r in res.runs],
            "median_tok_s": tps,
            "nitro_ratio": (nitro_tps / tps) if nitro_tps and tps else None,
        }
    return {
        "workload": ctx.workload.name,
        "description": ctx.workload.description,
        "model": {"path": ctx.source.path, "name": ctx.source.name, "dtype": str(ctx.source.dtype)},
        "requests": {
            "count": len(ctx.requests),
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in ctx.requests),
            "max_tokens": sum(r.max_tokens for r in ctx.requests),
            "seed": ctx.args.seed,
        },
        "environment": env,
        "systems": systems,
        "checks": [asdict(c) for c in checks],
    }


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="chat-64", choices=sorted(WORKLOADS))
    p.add_argument("--systems", default=None, help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests (smoke runs)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--model-path", default=None, help="HF folder (or .gguf) instead of the workload's default model")
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
    p.add_argument("--hf-cb-page-size", type=int, default=256, help="hf-cb tokens per cache page")
    p.add_argument("--hf-cb-num-blocks", type=int, default=256, help="hf-cb cache blocks (else ~60%% of RAM on CPU)")
    p.add_argument("--hf-cb-max-batch-tokens", type=int, default=2048, help="hf-cb token budget per step")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def select_systems(args: argparse.Namespace, workload: Workload) -> list[str]:
    names = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else list(workload.default_systems)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None:
        apply_omp_wait_policy(args.omp_wait_policy)
    _quiet_transformers()
    workload = WORKLOADS[args.workload]
    names = select_systems(args, workload)
    source = workload.resolve_model(args, workload)
    requests = workload.build_requests(args, source)
    if args.limit is not None:
        requests = requests[: args.limit]
    ctx = BenchContext(args, workload, source, requests)

    env = environment()
    print(environment_line(env))
    if env["load_avg_1m"] > (env["logical_cpus"] or 1):
        print(
            f"warning: this machine is busy (load {env['load_avg_1m']:.1f} on {env['logical_cpus']} CPUs): absolute "
            "tok/s are unreliable; the round-robin runs keep the ratios comparable"
            + ("; consider --omp-wait-policy passive" if env["omp_wait_policy"] == "unset" else "")
        )
    print(f"workload {workload.name}: {workload.description}")
    print(f"model {source.name} ({source.path}), {str(source.dtype).removeprefix('torch.')} on {source.device}")
    print(f"requests: {describe(requests)}")
    print(f"systems: {', '.join(names)}; repeats {args.repeats}", flush=True)

    results = benchmark(names, ctx, args.repeats)
    print()
    print(results_table(results, args.repeats))
    checks = run_checks(results, requests) if args.check else []
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(ctx, env, results, checks), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
