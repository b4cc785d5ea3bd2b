"""A tensor-parallel worker: rank 1..N-1 of a model split over N processes (`python -m
nitro_torch.runner.parallel.worker`, started by group.start_ranks; its stdin brings the WorkerBootstrap, then
every message of rank 0).

It loads its shard, builds its part of the KV cache and a ModelRunner without a sampler, then runs every step rank
0 broadcasts: the same inputs, so the same forward, whose collectives meet rank 0's. Only rank 0 samples; the tokens
it drew reach the worker with the next step. Any failure ends the process, which ends rank 0's too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys

import torch
import torch.distributed as dist

from nitro_torch.runner.parallel.group import JOIN_TIMEOUT, RankGroup, announce_worker
from nitro_torch.runner.parallel.messages import (
    RunEmbed,
    RunStep,
    StopWorkers,
    WorkerBootstrap,
    rank_report,
    read_frame,
)
from nitro_torch.runner.scheduler_output import SchedulerOutput

logger = logging.getLogger("nitro_torch.runner")

_PR_SET_PDEATHSIG = 1


def main() -> None:
    data = read_frame(sys.stdin.buffer)
    if data is None:
        sys.exit(1)  # rank 0 went before it sent the bootstrap
    bootstrap: WorkerBootstrap = pickle.loads(data)
    _die_with_parent(bootstrap.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the ranks stop
    logging.basicConfig(level=bootstrap.config.server.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [rank {bootstrap.rank}]: %(message)s")
    try:
        run_worker(bootstrap)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", bootstrap.rank)
        sys.exit(1)


def run_worker(bootstrap: WorkerBootstrap) -> None:
    from nitro_torch.models.loader import load_model
    from nitro_torch.runner.attention import register_paged_attention, set_attention_backend
    from nitro_torch.runner.embedder import Embedder
    from nitro_torch.runner.memory import build_kv_cache, kv_cache_dtype
    from nitro_torch.runner.model_runner import ModelRunner

    config = bootstrap.config
    store = dist.TCPStore(bootstrap.store_host, bootstrap.store_port, bootstrap.world_size, False,
                          timeout=JOIN_TIMEOUT)
    announce_worker(store, bootstrap.rank)
    group = RankGroup(bootstrap.rank, bootstrap.world_size, bootstrap.backend, inbox=sys.stdin.buffer)
    group.join(store, bootstrap.cpu_threads)
    set_attention_backend(config.runner.attention_backend)
    loaded = load_model(config.model, attn_implementation=register_paged_attention())
    kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, loaded.dtype, loaded.device,
                              packed_weights=not loaded.cpu_weights.exact)  # as rank 0 decides it
    kv_cache = build_kv_cache(loaded.model, loaded.device, kv_dtype, loaded.max_model_len, config, ranks=group)
    runner = ModelRunner(loaded.model, kv_cache, loaded.device)
    group.gather(rank_report(group.rank, loaded.model, kv_cache))
    embedder: Embedder | None = None
    last_step: SchedulerOutput | None = None
    while True:
        message = group.receive()
        if isinstance(message, StopWorkers):
            break
        if isinstance(message, RunStep):
            if last_step is not None:
                runner.requests.record(last_step, message.sampled_before)
            runner.requests.apply(message.step)
            runner.execute(message.step)
            last_step = message.step
        elif isinstance(message, RunEmbed):
            if embedder is None:
                embedder = Embedder(loaded.model, kv_cache, loaded.device, config.scheduler.max_num_batched_tokens)
            embedder.embed(message.token_id_lists)
    logger.debug("rank %d stops", group.rank)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this worker when the engine core's process goes, however it goes."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    if os.getppid() != parent_pid:  # it went before the line above took effect
        os._exit(1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
