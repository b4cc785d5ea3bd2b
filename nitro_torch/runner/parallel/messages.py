"""What rank 0 (the engine core's runner) tells the other ranks, as plain data: the step it is about to run, an
embedding call, or stop. Every rank then runs the same forward, so the collectives inside it meet. Each travels
pickled in a length-prefixed frame over the worker's stdin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

import torch

from nitro_torch.config import Config
from nitro_torch.models.tensor_parallel import local_weight_bytes
from nitro_torch.runner.kv_cache import GIB, KVCache
from nitro_torch.runner.scheduler_output import SchedulerOutput

MIB = 1 << 20
_LENGTH = 8
"""Bytes of a frame's length prefix."""


def write_frame(stream: IO[bytes], data: bytes) -> None:
    stream.write(len(data).to_bytes(_LENGTH, "little") + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> bytes | None:
    """The next frame's bytes; None at the end of the stream (the writer is gone)."""
    head = stream.read(_LENGTH)
    if len(head) < _LENGTH:
        return None
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    return data if len(data) == size else None


@dataclass(frozen=True)
class WorkerBootstrap:
    """A worker process's start: sent pickled on its stdin."""

    config: Config
    rank: int
    world_size: int
    backend: str
    """"gloo" (CPU) or "nccl" (CUDA)."""
    store_host: str
    store_port: int
    """rank 0's TCPStore, where the process group meets."""
    cpu_threads: int
    parent_pid: int


@dataclass
class RunStep:
    step: SchedulerOutput
    sampled_before: dict[str, int] = field(default_factory=dict)
    """The tokens rank 0 sampled in the previous step (request id -> token id): they join their requests on every
    rank before this step is applied, as they did on rank 0."""


@dataclass
class RunEmbed:
    token_id_lists: list[list[int]]


@dataclass
class StopWorkers:
    pass


WorkerMessage = RunStep | RunEmbed | StopWorkers


@dataclass(frozen=True)
class RankReport:
    """What one rank holds once its KV cache exists, for the start-up report."""

    rank: int
    device: str
    weight_bytes: int
    kv_cache_bytes: int
    device_memory_bytes: int | None
    """On CUDA: memory allocated on the rank's GPU; None on the CPU."""

    def describe(self) -> str:
        text = f"weights {self.weight_bytes / MIB:.1f} MiB, KV cache {self.kv_cache_bytes / MIB:.1f} MiB"
        if self.device_memory_bytes is not None:
            text += f", {self.device_memory_bytes / GIB:.2f} GiB allocated on the GPU"
        return text


def rank_report(rank: int, model: torch.nn.Module, kv_cache: KVCache) -> RankReport:
    device = kv_cache.layer_devices[0]
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    return RankReport(rank, str(device), local_weight_bytes(model), kv_cache.nbytes, allocated)
