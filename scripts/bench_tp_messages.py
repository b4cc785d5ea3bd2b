"""How long rank 0 takes to hand one step to a tensor-parallel worker: a pickled RunStep in a frame on the worker's
stdin pipe (what runner/parallel/group.py does) against torch.distributed's broadcast_object_list over gloo (the
obvious alternative), in the same run, for steps of 1, 64 and 256 decoding requests. Medians of 300 sends each;
round trips: the pipe's worker answers each message with a byte after unpickling it; the gloo worker meets rank 0
in a barrier after the broadcast.

    .venv/bin/python scripts/bench_tp_messages.py
"""

from __future__ import annotations

import os
import pickle
import statistics
import subprocess
import sys
import time
import uuid

import torch
import torch.distributed as dist

from nitro_torch.runner.parallel.messages import RunStep, read_frame, write_frame
from nitro_torch.runner.scheduler_output import SchedulerOutput

SIZES = (1, 64, 256)
SENDS = 300
WARM = 50


def step_message(num_requests: int) -> RunStep:
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(num_requests)]
    return RunStep(SchedulerOutput(num_scheduled_tokens={i: 1 for i in ids}), {i: 12345 for i in ids})


def median_us(samples: list[float]) -> float:
    return statistics.median(samples[WARM:]) * 1e6


def pipe_worker() -> None:
    while (data := read_frame(sys.stdin.buffer)) is not None:
        pickle.loads(data)
        sys.stdout.buffer.write(b"k")
        sys.stdout.buffer.flush()


def gloo_rank(rank: int, port: int, messages: list[RunStep]) -> list[float]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for message in messages:
        times = []
        for _ in range(SENDS):
            box: list[object] = [message] if rank == 0 else [None]
            started = time.perf_counter()
            dist.broadcast_object_list(box, src=0)
            dist.barrier()  # the worker has it (a round trip, as the pipe's answer byte)
            times.append(time.perf_counter() - started)
        results.append(median_us(times))
    dist.destroy_process_group()
    return results


def main() -> None:
    if sys.argv[1:] == ["pipe-worker"]:
        return pipe_worker()
    if sys.argv[1:2] == ["gloo-worker"]:
        gloo_rank(1, int(sys.argv[2]), [step_message(n) for n in SIZES])
        return None
    torch.set_num_threads(1)
    messages = [step_message(n) for n in SIZES]
    worker = subprocess.Popen([sys.executable, __file__, "pipe-worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    pipe = []
    for message in messages:
        times = []
        for _ in range(SENDS):
            started = time.perf_counter()
            write_frame(worker.stdin, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            worker.stdout.read(1)
            times.append(time.perf_counter() - started)
        pipe.append(median_us(times))
    worker.stdin.close()
    worker.wait()
    port = 29000 + os.getpid() % 1000
    peer = subprocess.Popen([sys.executable, __file__, "gloo-worker", str(port)])
    gloo = gloo_rank(0, port, messages)
    peer.wait()
    print(f"one step to one worker, round trip, median of {SENDS - WARM} (torch threads 1, {os.cpu_count()} CPUs)")
    print(" requests | pickled bytes | stdin pipe us | gloo broadcast us | gloo / pipe")
    for size, message, p, g in zip(SIZES, messages, pipe, gloo):
        print(f" {size:8d} | {len(pickle.dumps(message)):13d} | {p:13.0f} | {g:17.0f} | {g / p:10.1f}x")
    return None


if __name__ == "__main__":
    main()
