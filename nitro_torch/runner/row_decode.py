"""One request decoding alone on a CPU, compiled: the lean forward of packed weights (models/lean_decoder.py)
through torch.compile, with inductor's C++ wrapper. Its norms, rotary embedding, activations and residual adds
become a few fused C++ loops around torch's packed matmuls, and no Python runs between them: a single user's
decode step is then bound by reading the weights rather than by the interpreter (about a quarter faster on the
embedded model). The paged attention is an opaque op in the compiled graph, so its variable context length does
not change the graph's fixed shapes (one token of one request): it is compiled once.

Compiling takes about a minute on two cores the first time and seconds once inductor's cache (kept beside the
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

import torch

from nitro_torch.models.lean_decoder import LeanDecoder
from nitro_torch.runner.attention import AttentionMetadata, paged_attention_forward, step_context
from nitro_torch.runner.kv_cache import KVCache

logger = logging.getLogger("nitro_torch.runner")

RowDecodeMode = Literal["background", "startup", "off"]


class _Layer:
    """What the paged attention reads of the attention module calling it."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx


@torch.library.custom_op("nitro_torch::step_attention", mutates_args=())
def step_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float,
                   sliding_window: int) -> torch.Tensor:
    """The engine's paged attention for the current step. It also stores K/V in the cache: state outside the
    compiled graph, which no other op of the graph reads."""
    out, _ = paged_attention_forward(_Layer(layer), query, key, value, None,  # type: ignore[arg-type]
                                     scaling=scale, sliding_window=sliding_window or None)
    return out


@step_attention.register_fake
def _step_attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float,
                          sliding_window: int) -> torch.Tensor:
    batch, heads, tokens, head_dim = query.shape
    return query.new_empty(batch, tokens, heads, head_dim)


def _opaque_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None,
                      sliding_window: int | None = None, **_: object) -> tuple[torch.Tensor, None]:
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    return step_attention(query, key, value, int(module.layer_idx), scale, int(sliding_window or 0)), None


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
        opaque = decoder.with_attention(_opaque_attention)
        step = _steps[decoder] = torch.compile(opaque.logits, dynamic=False, fullgraph=True,
                                               options={"cpp_wrapper": True})
    return step


class RowDecode:
    """The compiled decode step of one request: `ready` once compiled; then `logits(token_ids, positions)`."""

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

    def logits(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """[1, V] for one token [1] at its position [1], inside the step's context; None (and eager from then on)
        if it would have to compile again."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._compiled(token_ids[None], positions[None])
        except torch._dynamo.exc.RecompileError as exc:  # an unforeseen change of state: never compile mid-serving
            logger.warning("the compiled one-request decode step would compile again (%s); decoding eagerly",
                           str(exc).splitlines()[0])
            self.ready = False
            return None

    def _compile(self) -> None:
        started = time.monotonic()
        try:
            with torch.inference_mode(), step_context(self._scratch_step()):
                self._compiled(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager path, which works
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.warning("compiling the one-request decode step failed (%s); it stays eager", self.error)
            return
        self.seconds = time.monotonic() - started
        self.ready = True
        logger.info("one-request decode step compiled in %.1f s", self.seconds)

    def _scratch_step(self) -> AttentionMetadata:
        """A decode step of one token into the cache's spare block, which no request owns."""
        spare = self.kv_cache.num_blocks
        return AttentionMetadata(
            kv_cache=self.kv_cache, slot_mapping=torch.tensor([spare * self.kv_cache.layout.block_size]),
            num_decode_tokens=1, decode_block_tables=torch.tensor([[spare]]),
            decode_context_lens=torch.tensor([1]), single_decode_len=1, single_decode_first_block=spare,
            single_decode_slot=spare * self.kv_cache.layout.block_size,
        )
