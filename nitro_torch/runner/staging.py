"""Moves a step's integer inputs to the device in one copy through a reused (pinned, on CUDA) host buffer.

A step has a dozen small index tensors; one torch.tensor(..., device="cuda") each would be a dozen pageable
copies, each a host sync. Here they are packed end to end into one pinned int64 buffer, copied with one
non-blocking transfer into a reused device buffer, and handed out as views. Both buffers only grow.

The device buffer is rewritten only by a copy queued behind every kernel of the previous step, so stream order
protects it. The pinned buffer is not: a step in which no request samples ends without a host sync, so before
rewriting it we wait for the event recorded after the previous transfer (normally long done: no wait).
On the CPU the packed tensor is the inputs themselves: one tensor a step, no buffers, no copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

IntRows = Sequence[int] | Sequence[Sequence[int]]


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

    def upload(self, arrays: Mapping[str, IntRows]) -> dict[str, torch.Tensor]:
        """int64 device tensors of the given lists (1-D) or equal-length rows (2-D), by name."""
        flat: list[int] = []
        layout: list[tuple[str, int, tuple[int, ...]]] = []
        for name, values in arrays.items():
            start = len(flat)
            if values and isinstance(values[0], Sequence):
                width = len(values[0])
                for row in values:
                    flat.extend(row)  # type: ignore[arg-type]
                shape: tuple[int, ...] = (len(values), width)
            else:
                flat.extend(values)  # type: ignore[arg-type]
                shape = (len(values),)
            layout.append((name, start, shape))
        total = len(flat)
        if self.device.type == "cpu":  # the inputs are already where they are used: one tensor, no copies
            buffer = torch.tensor(flat, dtype=torch.long)
        else:
            if self._copy_pending:
                self._copied.synchronize()  # type: ignore[union-attr]
                self._copy_pending = False
            self._ensure_capacity(total)
            buffer = self._device_buffer
            if total:
                self._host[:total].copy_(torch.tensor(flat, dtype=torch.long))
                buffer[:total].copy_(self._host[:total], non_blocking=True)
                if self._copied is not None:
                    self._copied.record()
                    self._copy_pending = True
        out = {}
        for name, start, shape in layout:
            count = shape[0] * (shape[1] if len(shape) == 2 else 1)
            out[name] = buffer[start:start + count].view(shape)
        return out

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._host.numel():
            return
        capacity = max(needed, 2 * self._host.numel())
        self._host = self._new_host(capacity)
        self._device_buffer = torch.empty(capacity, dtype=torch.long, device=self.device)
