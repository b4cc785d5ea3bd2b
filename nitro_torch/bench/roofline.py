"""Roofline ceilings: the device's measured limits and the output tokens/s they allow for a workload.

Model dims (llama-style decoder): L layers, hidden d, H query heads, K kv heads, head dim h, MLP width f, vocab V.

    layer params  N_layer = L * (d*H*h + 2*d*K*h + H*h*d + 3*d*f)   (q, k, v, o, gate/up/down; norms ignored)
    LM head       N_head  = V * d

Compute bound (batched work, w256). A request with P prompt and O output tokens feeds n = P + O - 1 tokens
through the layers (the last sampled token is never fed back) and samples O tokens through the LM head; token i
attends to i + 1 keys, QK^T and PV costing 2*H*h FLOPs per key each:

    FLOPs         = 2*N_layer*n + 2*N_head*O + 4*L*H*h * n*(n+1)/2
    ceiling tok/s = sum(O) / (sum(FLOPs) / matmul FLOP/s)

Bandwidth bound (batch-1 decode). Every decoded token reads all weights once plus its KV cache at context c
(mean over the request: c = P + (O - 1)/2), s bytes per KV element:

    bytes/token   = W + 2*L*K*h*c*s
    ceiling tok/s = copy bytes/s / bytes/token        (requests one after another)

W is measured on the loaded model: every parameter and buffer (quantized storage and bitsandbytes' scales
included) except the input embedding table, of which a token reads one row (unless it is tied to the LM head).

Ceilings measured in the same run: matmul FLOP/s = 2*n^3 per n x n @ n x n matmul (bf16, n = 8192 on CUDA; the
workload's dtype, n = 1024 on CPU); copy bytes/s = 2 * size per `dst.copy_(src)` (read + write; 1 GiB on CUDA,
64 MiB on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nitro_torch.bench.workloads import BenchRequest


@dataclass(frozen=True)
class ModelDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        return cls(
            layers=int(text.num_hidden_layers),
            hidden=int(text.hidden_size),
            heads=heads,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
            intermediate=int(text.intermediate_size),
            vocab=int(text.vocab_size),
        )

    @property
    def layer_params(self) -> int:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (d * q + 2 * d * kv + q * d + 3 * d * self.intermediate)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden


@dataclass(frozen=True)
class Ceilings:
    device: str
    matmul_flops: float
    matmul_dtype: str
    copy_bytes_s: float

    def describe(self) -> str:
        return (f"{self.device}: {self.matmul_dtype} matmul {self.matmul_flops / 1e12:.2f} TFLOP/s, "
                f"copy {self.copy_bytes_s / 1e9:.1f} GB/s (read + write)")


@dataclass(frozen=True)
class Roofline:
    bound: Literal["compute", "bandwidth"]
    ceiling_tok_s: float
    detail: str


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul_flops(device: str, dtype: torch.dtype, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: library handles, kernel selection
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b, out=out)
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def measure_copy_bandwidth(device: str, nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def measure_ceilings(device: str, dtype: torch.dtype) -> Ceilings:
    if device.startswith("cuda"):
        flops = measure_matmul_flops(device, torch.bfloat16, 8192, 20)
        copy = measure_copy_bandwidth(device, 1 << 30, 20)
        matmul_dtype = torch.bfloat16
    else:
        flops = measure_matmul_flops(device, dtype, 1024, 5)
        copy = measure_copy_bandwidth(device, 64 << 20, 5)
        matmul_dtype = dtype
    return Ceilings(device, flops, str(matmul_dtype).removeprefix("torch."), copy)


def request_flops(dims: ModelDims, prompt_len: int, output_len: int) -> float:
    n = prompt_len + output_len - 1
    attention = 4 * dims.layers * dims.heads * dims.head_dim * n * (n + 1) / 2
    return 2 * dims.layer_params * n + 2 * dims.lm_head_params * output_len + attention


def compute_roofline(dims: ModelDims, requests: Sequence[BenchRequest], ceilings: Ceilings) -> Roofline:
    flops = sum(request_flops(dims, len(r.prompt_token_ids), r.max_tokens) for r in requests)
    seconds = flops / ceilings.matmul_flops
    tokens = sum(r.max_tokens for r in requests)
    detail = f"{flops / 1e15:.3g} PFLOP at {ceilings.matmul_flops / 1e12:.3g} TFLOP/s"
    return Roofline("compute", tokens / seconds, detail)


def bandwidth_roofline(dims: ModelDims, requests: Sequence[BenchRequest], weight_bytes: int, kv_elem_bytes: int,
                       ceilings: Ceilings) -> Roofline:
    kv_per_position = 2 * dims.layers * dims.kv_heads * dims.head_dim * kv_elem_bytes
    total_bytes = 0.0
    for r in requests:
        mean_context = len(r.prompt_token_ids) + (r.max_tokens - 1) / 2
        total_bytes += r.max_tokens * (weight_bytes + kv_per_position * mean_context)
    tokens = sum(r.max_tokens for r in requests)
    seconds = total_bytes / ceilings.copy_bytes_s
    detail = f"{weight_bytes / 1e9:.3g} GB of weights per token at {ceilings.copy_bytes_s / 1e9:,.0f} GB/s"
    return Roofline("bandwidth", tokens / seconds, detail)


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads (see the module docstring)."""
    # torch types unknown Module attributes as Tensor | Module; these are transformers' methods when present.
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None  # type: ignore[operator]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    embed_weight = getattr(embedding, "weight", None)
    tied = embed_weight is not None and getattr(head, "weight", None) is embed_weight
    total = 0
    for param in model.parameters():
        if param is embed_weight and not tied:
            total += param[0].numel() * param.element_size()
            continue
        total += param.numel() * param.element_size() + _bnb_state_bytes(param)
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _bnb_state_bytes(param: torch.Tensor) -> int:
    """Scales bitsandbytes keeps beside its packed weights (nf4 absmax, double-quant stats; int8 row scales)."""
    tensors = []
    state = getattr(param, "quant_state", None)
    if state is not None:
        tensors += [getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)]
    tensors.append(getattr(param, "SCB", None))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
