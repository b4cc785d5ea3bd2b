"""The shared vocabulary of the benchmark modules: a workload's definition and one run's context."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nitro_torch.bench.models import ModelSource
from nitro_torch.bench.options import BASELINES, NITRO, REFERENCE_SYSTEM, SERVER
from nitro_torch.bench.workloads import BenchRequest

__all__ = ["BASELINES", "NITRO", "REFERENCE_SYSTEM", "SERVER", "BenchContext", "Workload"]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    resolve_model: Callable[[argparse.Namespace, Workload], ModelSource]
    build_requests: Callable[[argparse.Namespace, ModelSource], list[BenchRequest]]
    static_batch_size: int
    """Batch size of the `hf-static` baseline."""
    device: str = "auto"
    """"auto": cuda when available, else cpu."""
    dtype: torch.dtype | None = None
    """None: bf16 on CUDA, fp32 on CPU."""
    nitro_options: dict[str, Any] = field(default_factory=dict)
    """Extra nitro_torch config options (build_config keys)."""
    default_systems: tuple[str, ...] = ("nitro", "hf-static", "hf-cb")
    bound: Literal["compute", "bandwidth"] = "compute"
    """Which roofline limits this workload: batched work is compute-bound, batch-1 decode bandwidth-bound."""
    default_shape: str | None = None
    """Random-init shape (nitro_torch.bench.options.SHAPES) when --shape is not given; None: real weights only."""
    default_repeats: int = 1
    default_baseline_limit: int | None = None
    """Requests the HF baselines run when --baseline-limit is not given (None: all)."""
    one_at_a_time: bool = False
    """Every system runs the requests one after the other (a single user), not all at once."""


@dataclass
class BenchContext:
    args: argparse.Namespace
    workload: Workload
    source: ModelSource
    requests: list[BenchRequest]
    baseline_limit: int | None = None
    weight_bytes: dict[str, int] = field(default_factory=dict)
    """Per system: bytes of weights its model reads per decoded token (for the bandwidth roofline)."""
    server_model: str | None = None
    """The model the `server` system asked the server for (its --model, else the server's first listed)."""

    def requests_for(self, system: str) -> list[BenchRequest]:
        """The HF baselines may be cut to the first `baseline_limit` requests to keep GPU runs short."""
        if system in BASELINES and self.baseline_limit is not None:
            return self.requests[: self.baseline_limit]
        return self.requests
