"""The ranks of a tensor-parallel model: rank 0 runs in the engine core's process and starts ranks 1..N-1 as worker
processes (runner/parallel/worker.py); they meet in one torch.distributed process group (gloo on the CPU, NCCL on
CUDA) through rank 0's TCPStore. Control messages (messages.py) travel pickled over each worker's stdin pipe: sending a
64-request step takes ~30 µs there, where a gloo broadcast took ~0.8 ms on a 2-core machine. Collectives over gloo
only agree on numbers at start-up.

torch.distributed is process-wide, so is this: a process is in at most one group (`current_ranks`).

A worker that dies takes rank 0 down with it: a watchdog thread sees the exit and, in the engine core's process,
ends the process at once (the server then fails every request and /health answers 503); elsewhere it marks the
group lost, so the next step raises instead of waiting on a collective that cannot complete.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import IO, Any, Literal

import torch
import torch.distributed as dist

from nitro_torch.config import Config
from nitro_torch.runner.parallel.messages import StopWorkers, WorkerBootstrap, WorkerMessage, read_frame, write_frame

logger = logging.getLogger("nitro_torch.runner")

JOIN_TIMEOUT = timedelta(minutes=30)
"""How long the ranks may take to meet (each loads its shard first) and a collective may wait."""
_STOP_WAIT_S = 10.0

WorkerDeath = Literal["exit", "raise"]
"""What rank 0 does when a worker dies: end its process (the engine core's), or raise on the next step."""


class RanksLost(RuntimeError):
    """A rank of the tensor-parallel group is gone: the model cannot run any more."""


class RankGroup:
    """This process's place among the ranks: send (rank 0) and receive (the others) step messages, agree on
    numbers."""

    def __init__(self, rank: int, world_size: int, backend: str, inbox: IO[bytes] | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.inbox = inbox
        """A worker's end of rank 0's messages (its stdin)."""
        self.control: Any = None
        """The gloo group for start-up agreements (block count, reports), whatever carries the tensors (None: the
        default group)."""
        self.connected = False
        self.lost: str | None = None
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self.on_death: WorkerDeath = "raise"

    def join(self, store: Any, threads: int) -> None:
        """Meet the other ranks in the process group (every rank calls this)."""
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
        if self.backend == "nccl":
            torch.cuda.set_device(self.rank)
        else:
            torch.set_num_threads(threads)
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=JOIN_TIMEOUT)
        if self.backend != "gloo":
            self.control = dist.new_group(backend="gloo")
        self.connected = True

    # messages ----------------------------------------------------------------------------------------

    def broadcast(self, message: WorkerMessage) -> None:
        if self.lost is not None:
            raise RanksLost(self.lost)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for process in self._workers:
                assert process.stdin is not None
                write_frame(process.stdin, data)
        except (OSError, ValueError) as exc:  # a closed pipe: the worker is gone
            raise self.check_step(exc) from exc

    def receive(self) -> WorkerMessage:
        """A worker: the next message from rank 0 (StopWorkers once rank 0 is gone)."""
        assert self.inbox is not None
        data = read_frame(self.inbox)
        return StopWorkers() if data is None else pickle.loads(data)

    def agree_min(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        return int(tensor.item())

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.control)
        return out

    def check_step(self, exc: BaseException) -> BaseException:
        """The error a failed step raises: any failure leaves the ranks out of step, so it is always RanksLost."""
        if isinstance(exc, RanksLost):
            return exc
        return RanksLost(self._dead_worker() or f"a tensor-parallel step failed on rank {self.rank}: {exc}")

    def _dead_worker(self, wait_s: float = 2.0) -> str | None:
        """What the watchdog saw, waiting a moment for it: a collective may fail a little before the exit is seen."""
        deadline = time.monotonic() + wait_s
        while (self.lost is None and time.monotonic() < deadline
               and any(process.poll() is not None for process in self._workers)):
            time.sleep(0.05)  # a worker has exited: its watchdog thread is wording it
        return self.lost

    # workers (rank 0) --------------------------------------------------------------------------------

    def watch(self, workers: list[subprocess.Popen[bytes]]) -> None:
        self._workers = workers
        for rank, process in enumerate(workers, start=1):
            threading.Thread(target=self._wait_for, args=(rank, process), daemon=True,
                             name=f"nitro-tp-watch-{rank}").start()

    def exit_on_worker_death(self) -> None:
        """From now on a worker's death ends this process at once (the engine core's, once it serves): it may be
        waiting in a collective that cannot complete, and the server must learn of it."""
        self.on_death = "exit"

    @property
    def worker_pids(self) -> list[int]:
        return [process.pid for process in self._workers]

    def _wait_for(self, rank: int, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        if self._stopping:
            return
        self.lost = f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}"
        logger.error("%s; the model cannot step any more", self.lost)
        self._kill_workers()
        if self.on_death == "exit":
            logging.shutdown()
            os._exit(70)  # the server sees the core's pipe close: every request fails, /health answers 503

    def close(self) -> None:
        """Rank 0: tell the workers to stop, wait a moment, kill what is left; leave the process group."""
        global _current
        if self._stopping:
            return
        self._stopping = True
        if self.rank == 0 and self.lost is None and self.connected:
            try:
                self.broadcast(StopWorkers())
            except RanksLost:
                pass
        for process in self._workers:
            try:
                if process.stdin is not None:
                    process.stdin.close()
                process.wait(_STOP_WAIT_S)
            except OSError:
                pass
            except subprocess.TimeoutExpired:
                process.kill()
        self._kill_workers()
        if self.connected and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group whose peers are gone may fail to tear down; the process moves on
                logger.debug("process group teardown failed", exc_info=True)
        if _current is self:
            _current = None

    def _kill_workers(self) -> None:
        for process in self._workers:
            if process.poll() is None:
                process.kill()
                process.wait()


_current: RankGroup | None = None


def current_ranks() -> RankGroup | None:
    return _current


def distributed_backend(config: Config) -> str:
    from nitro_torch.models.loader import resolve_device

    return "nccl" if resolve_device(config.model.device).type == "cuda" else "gloo"


def start_ranks(config: Config, cpu_threads: int | None = None) -> RankGroup:
    """Rank 0: start the worker processes and meet them in the process group (before any rank loads its shard)."""
    global _current
    if _current is not None:
        raise RuntimeError("this process is already in a tensor-parallel group")
    size = config.model.tensor_parallel_size
    backend = distributed_backend(config)
    threads = per_rank_threads(cpu_threads, size)
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=JOIN_TIMEOUT, wait_for_workers=False)
    workers = [_spawn_worker(WorkerBootstrap(config, rank, size, backend, "127.0.0.1", store.port, threads,
                                             os.getpid()))
               for rank in range(1, size)]
    group = RankGroup(0, size, backend)
    group.watch(workers)
    try:
        _await_workers(store, workers)
        group.join(store, threads)
    except BaseException:
        group.close()
        raise
    _current = group
    logger.info("tensor parallelism: %d ranks (%s), worker pids %s", size, backend, group.worker_pids)
    return group


def announce_worker(store: Any, rank: int) -> None:
    store.set(f"worker-{rank}-up", "1")


def _await_workers(store: Any, workers: list[subprocess.Popen[bytes]]) -> None:
    """Wait until every worker reached the store, failing at once if one exits first (init_process_group would
    wait for it until its timeout)."""
    keys = [f"worker-{rank}-up" for rank in range(1, len(workers) + 1)]
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    while not store.check(keys):
        for rank, process in enumerate(workers, start=1):
            if process.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {process.returncode} while "
                                   "starting (its error is in the log above)")
        if time.monotonic() > deadline:
            raise RuntimeError("the tensor-parallel workers did not start in time")
        time.sleep(0.05)


def per_rank_threads(cpu_threads: int | None, size: int) -> int:
    """CPU threads per rank: the cores (or --cpu-threads) shared out, at least one each."""
    total = cpu_threads or torch.get_num_threads()
    return max(1, total // size)


def _spawn_worker(bootstrap: WorkerBootstrap) -> subprocess.Popen[bytes]:
    """A worker process; its stdin stays open: the bootstrap first, then every message of rank 0."""
    process = subprocess.Popen([sys.executable, "-m", "nitro_torch.runner.parallel.worker"], stdin=subprocess.PIPE)
    assert process.stdin is not None
    write_frame(process.stdin, pickle.dumps(bootstrap))
    return process

