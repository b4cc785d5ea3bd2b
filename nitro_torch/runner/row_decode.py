"""One request decoding alone on a CPU, compiled: the lean forward of packed weights (models/lean_decoder.py)
through torch.compile, with inductor's C++ wrapper. Its norms, rotary embedding, activations and residual adds
become a few fused C++ loops around torch's packed matmuls, and no Python runs between them: a single user's
decode step is then bound by reading the weights rather than by the interpreter. The attention is traced into the
graph too (`graph_attention`): the token's K/V store and its attention over its cache slots, with the number of
slots a dynamic size, so one compilation serves every context length. As an opaque op calling the eager paged
attention it cost ~180 us a layer on the embedded model (Python, a dozen small ops, the op boundary), 5 of a
token's 16 ms at a 200-token context; traced, the step takes two thirds of that time.

Compiling takes one to two minutes on two cores the first time and seconds once inductor's cache (kept beside the
converted models) has it; `background` compiles in a thread while the engine serves eagerly, then swaps it in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nitro_torch.models.lean_decoder import LeanDecoder
from nitro_torch.runner.kv_cache import KVCache

logger = logging.getLogger("nitro_torch.runner")

RowDecodeMode = Literal["background", "startup", "off"]


def graph_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    sliding_window: int | None = None, *, store_slot: torch.Tensor, key_slots: torch.Tensor,
                    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                    **_: object) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for one token, traced into the compiled step: its K/V go into the layer's
    cache at `store_slot` [1], then it attends to the cache rows `key_slots` [L] (its context, itself last).
    L is a dynamic size, so one graph serves every context length; a sliding window masks the keys before it."""
    layer = int(module.layer_idx)
    num_kv_heads, head_dim = key_caches[layer].shape[2:]
    k_rows = key_caches[layer].view(-1, num_kv_heads, head_dim)  # [slots, KV, D]
    v_rows = value_caches[layer].view(-1, num_kv_heads, head_dim)
    k_rows.index_copy_(0, store_slot, key[0].transpose(0, 1).to(k_rows.dtype))  # [1, KV, 1, D] -> [1, KV, D]
    v_rows.index_copy_(0, store_slot, value[0].transpose(0, 1).to(v_rows.dtype))
    keys = k_rows.index_select(0, key_slots).float()  # [L, KV, D]
    values = v_rows.index_select(0, key_slots).float()
    num_heads = query.shape[1]
    scale = head_dim ** -0.5 if scaling is None else scaling
    grouped = (query[0, :, 0].float() * scale).view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("kgd,lkd->kgl", grouped, keys)
    if sliding_window:
        count = key_slots.shape[0]
        scores = scores.masked_fill(torch.arange(count) < count - sliding_window, float("-inf"))
    out = torch.einsum("kgl,lkd->kgd", scores.softmax(dim=-1), values)
    return out.reshape(1, 1, num_heads, head_dim).to(query.dtype), None


def key_slots(block_table: np.ndarray, context_len: int, first_block: int | None, block_size: int) -> torch.Tensor:
    """[context_len] cache slots of a request's tokens, from its block table row (or its first block, when its
    blocks follow each other)."""
    if first_block is not None:
        return torch.arange(first_block * block_size, first_block * block_size + context_len)
    slots = (block_table[:, None] * block_size + np.arange(block_size)).reshape(-1)[:context_len]
    return torch.from_numpy(slots)


def use_inductor_cache_in(cache_root: Path) -> None:
    """Keep inductor's compiled code with the converted models (a volume that outlives a container), unless the
    user chose a place with TORCHINDUCTOR_CACHE_DIR."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root / "inductor"))


_steps: weakref.WeakKeyDictionary[LeanDecoder, Callable[..., torch.Tensor]] = weakref.WeakKeyDictionary()


def _compiled_step(decoder: LeanDecoder) -> Callable[..., torch.Tensor]:
    """One per decoder: an engine made again on the same model reuses its compiled code (the cache lives on the
    step's code object, and a new decoder object would fail its guards and compile again)."""
    step = _steps.get(decoder)
    if step is None:
        # every model of a process (tests, a model switch) compiles the same code once more: allow a few dozen
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        traced = decoder.with_attention(graph_attention)
        step = _steps[decoder] = torch.compile(traced.logits, fullgraph=True, options={"cpp_wrapper": True})
    return step


class RowDecode:
    """The compiled decode step of one request: `ready` once compiled; then `logits(...)`."""

    def __init__(self, decoder: LeanDecoder, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self._compiled = _compiled_step(decoder)
        self.ready = False
        self.seconds: float | None = None
        """How long compiling took."""
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, mode: RowDecodeMode) -> None:
        if mode == "startup":
            self._compile()
        elif mode == "background":
            self._thread = threading.Thread(target=self._compile, name="nitro-row-decode-compile", daemon=True)
            self._thread.start()

    @property
    def compiling(self) -> bool:
        """A background compilation is still running (a lone request decodes eagerly meanwhile)."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Until a background compilation ended; whether the compiled step is in use."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def logits(self, token_ids: torch.Tensor, positions: torch.Tensor, store_slot: torch.Tensor,
               key_slots: torch.Tensor) -> torch.Tensor | None:
        """[1, V] for one token [1] at its position [1], stored at cache slot `store_slot` [1] and attending to
        `key_slots` [L] (see `key_slots`); None (and eager from then on) if it would have to compile again."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._run(token_ids, positions, store_slot, key_slots)
        except torch._dynamo.exc.RecompileError as exc:  # an unforeseen change of state: never compile mid-serving
            logger.warning("the compiled one-request decode step would compile again (%s); decoding eagerly",
                           str(exc).splitlines()[0])
            self.ready = False
            return None

    def _run(self, token_ids: torch.Tensor, positions: torch.Tensor, store_slot: torch.Tensor,
             key_slots: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_dynamic(key_slots, 0)
        return self._compiled(token_ids[None], positions[None], store_slot=store_slot, key_slots=key_slots,
                              key_caches=self.kv_cache.keys, value_caches=self.kv_cache.values)

    def _compile(self) -> None:
        started = time.monotonic()
        spare_slot = self.kv_cache.num_blocks * self.kv_cache.layout.block_size  # the spare block: no request's
        try:
            with torch.inference_mode():  # a decode of one token into the spare block, over two of its slots
                self._run(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                          torch.tensor([spare_slot + 1]), torch.tensor([spare_slot, spare_slot + 1]))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager path, which works
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.warning("compiling the one-request decode step failed (%s); it stays eager", self.error)
            return
        self.seconds = time.monotonic() - started
        self.ready = True
        logger.info("one-request decode step compiled in %.1f s", self.seconds)
