"""Moves a step's integer inputs to the device in one copy through a reused (pinned, on CUDA) host buffer.

A step has a dozen small index tensors; one torch.tensor(..., device="cuda") each would be a dozen pageable
copies, each a host sync. Here they are packed end to end into one pinned int64 buffer, copied with one
non-blocking transfer into a reused device buffer, and handed out as views. Both buffers only grow.

The device buffer is rewritten only by a copy queued behind every kernel of the previous step, so stream order
protects it. The pinned buffer is not: a step in which no request samples ends without a host sync, so before
rewriting it we wait for the event recorded after the previous transfer (normally long done: no wait).
On the CPU the arrays are used where they are (torch views of the numpy arrays): no buffers, no copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

IntArray = np.ndarray | Sequence[int] | Sequence[Sequence[int]]


class InputStaging:
    def __init__(self, device: torch.device, initial_capacity: int = 1 << 14) -> None:
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        capacity = initial_capacity if self.device.type != "cpu" else 0  # on the CPU each step's tensor is its own
        self._host = self._new_host(capacity)
        self._device_buffer = torch.empty(capacity, dtype=torch.long, device=self.device)
        self._copied = torch.cuda.Event() if self._pinned else None
        self._copy_pending = False

    def _new_host(self, capacity: int) -> torch.Tensor:
        return torch.empty(capacity, dtype=torch.long, pin_memory=self._pinned)

    def upload(self, arrays: Mapping[str, IntArray]) -> dict[str, torch.Tensor]:
        """int64 device tensors of the given arrays or lists (1-D) or equal-length rows (2-D), by name."""
        parts = [np.asarray(values, dtype=np.int64) for values in arrays.values()]
        if self.device.type == "cpu":  # the inputs are already where they are used: the arrays' own memory
            return {name: torch.from_numpy(part) for name, part in zip(arrays, parts)}
        flat = np.concatenate([part.reshape(-1) for part in parts]) if parts else np.zeros(0, np.int64)
        total = len(flat)
        if self._copy_pending:
            self._copied.synchronize()  # type: ignore[union-attr]
            self._copy_pending = False
        self._ensure_capacity(total)
        buffer = self._device_buffer
        if total:
            self._host[:total].copy_(torch.from_numpy(flat))
            buffer[:total].copy_(self._host[:total], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
                self._copy_pending = True
        out = {}
        start = 0
        for name, part in zip(arrays, parts):
            out[name] = buffer[start:start + part.size].view(part.shape)
            start += part.size
        return out

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._host.numel():
            return
        capacity = max(needed, 2 * self._host.numel())
        self._host = self._new_host(capacity)
        self._device_buffer = torch.empty(capacity, dtype=torch.long, device=self.device)
