"""Resolve --model to a local HF folder and load model + tokenizer onto the chosen device.

A hub name is served from the standard Hugging Face cache, downloaded first when it is not there (hub.py);
.gguf files (the embedded default model, and GGUF quants from the hub) are converted once into safetensors folders
(embedded.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nitro_torch.config import ConfigError, ModelConfig, served_names
from nitro_torch.models.cpu_weights import FP32, PackedWeights, pack_cpu_weights
from nitro_torch.models.embedded import DEFAULT_MODEL_NAME, embedded_gguf_path, ensure_converted, report_progress
from nitro_torch.models.hub import cached_gguf_file, fetch_model
from nitro_torch.models.hub_cache import hf_hub_cache_dir  # noqa: F401  (imported from here by the server)
from nitro_torch.models.hub_errors import ModelNotFoundError
from nitro_torch.models.hub_names import hub_name_of
from nitro_torch.models.quantization import activation_dtype, plan_quantization
from nitro_torch.models.tensor_parallel import tensor_parallel_arguments

logger = logging.getLogger("nitro_torch.models")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tokenizers without a known limit report a huge placeholder (int(1e30)); anything above this is not a real limit.
_SANE_TOKENIZER_LIMIT = 10_000_000
_FALLBACK_MAX_MODEL_LEN = 2048


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval(), on device, requires_grad off
    tokenizer: PreTrainedTokenizerBase
    name: str  # served model name
    source_path: str  # the HF folder actually loaded
    device: torch.device
    dtype: torch.dtype  # activations and KV cache; quantized weights are stored narrower
    max_model_len: int
    eos_token_ids: frozenset[int]
    quantization: str = "none"  # e.g. "bnb-4bit nf4", "bnb-8bit (pre-quantized checkpoint)"
    cpu_weights: PackedWeights = FP32


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available (use --device cpu or auto)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_source(model: str, cache_dir: str | None = None,
                         hf_token_file: str | None = None) -> tuple[str, str]:
    """-> (local HF folder, display name) for 'default', a .gguf file, a local folder, or a hub name (from the
    cache, downloaded first when missing)."""
    if model == "default":
        try:
            gguf_path = embedded_gguf_path()
        except FileNotFoundError as error:
            raise ModelNotFoundError(str(error)) from None
        return str(ensure_converted(gguf_path, cache_dir)), DEFAULT_MODEL_NAME

    as_path = Path(model).expanduser()
    if model.lower().endswith(".gguf"):
        if not as_path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {as_path}")
        return str(ensure_converted(as_path, cache_dir)), as_path.stem
    if as_path.is_dir():
        _require_config_json(as_path, model)
        return str(as_path.resolve()), as_path.resolve().name
    hub_name = hub_name_of(model)
    if hub_name is None:
        raise ModelNotFoundError(
            f"model {model!r} is neither a folder with config.json, a .gguf file, nor a hub name ORG/NAME "
            f"(no such folder: {as_path})"
        )
    fetched = fetch_model(model, hf_token_file=hf_token_file, cache_dir=cache_dir)
    assert fetched is not None
    if fetched.suffix == ".gguf":
        return str(ensure_converted(fetched, cache_dir)), str(hub_name)
    _require_config_json(fetched, model)
    return str(fetched), str(hub_name)


def gguf_file_of(model: str, cache_dir: str | None = None) -> Path | None:
    """The .gguf file --model names (the embedded model's for 'default', the cached file of a hub GGUF quant):
    its blocks can be computed as stored."""
    if model == "default":
        return embedded_gguf_path()
    if model.lower().endswith(".gguf"):
        return Path(model).expanduser()
    return cached_gguf_file(model, cache_dir)


def _require_config_json(folder: Path, model: str) -> None:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{model!r} is not a Hugging Face model folder: {folder / 'config.json'} is missing")


def load_tokenizer(model: str = "default", cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    path, _ = resolve_model_source(model, cache_dir)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def apply_chat_template_file(tokenizer: PreTrainedTokenizerBase, path: str | None) -> None:
    """Replace the model's chat template with the one in `path` (--chat-template), if given."""
    if not path:
        return
    if not Path(path).is_file():
        raise ConfigError(f"chat template file not found: {path}")
    tokenizer.chat_template = Path(path).read_text(encoding="utf-8")


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def load_model(config: ModelConfig, attn_implementation: str | None = None) -> LoadedModel:
    path, derived_name = resolve_model_source(config.model, config.model_cache_dir, config.hf_token_file)
    name = next(iter(served_names(config.served_model_name)), derived_name)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    tensor_parallel = tensor_parallel_load(config)
    if tensor_parallel and device.type == "cuda":
        device = torch.device("cuda", torch.distributed.get_rank())  # transformers binds rank r to GPU r
    quantization = plan_quantization(config, path, dtype, device)
    weights = "" if quantization.description == "none" else f", {quantization.description}"

    report_progress(f"loading {name} ({_dtype_name(dtype)}{weights}, {device}) from {path} ...")
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # An explicit quantization_config=None would make transformers ignore a pre-quantized checkpoint's own.
    quantize = {"quantization_config": quantization.config} if quantization.config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
        device_map=None if tensor_parallel else _device_map(config, device, quantization.bitsandbytes),
        **quantize, **tensor_parallel,
    )
    if not quantization.bitsandbytes and config.device_map == "none" and not tensor_parallel:
        model.to(device)  # type: ignore[arg-type]  # transformers' decorated `to` mistypes its first argument
    model.eval()
    model.requires_grad_(False)
    cpu_weights = pack_cpu_weights(model, "fp32" if tensor_parallel else config.cpu_weights, device,
                                   gguf_file_of(config.model, config.model_cache_dir), quantization.description)
    packed = "" if cpu_weights.exact else f", {cpu_weights.description}"
    report_progress(f"loaded {name} (quantization: {quantization.description}{packed}) in "
                    f"{time.monotonic() - started:.1f} s")
    if not has_chat_template(tokenizer):
        logger.warning("%s has no chat template; chat prompts use Nitro's prompt prefixes", name)

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source_path=path,
        device=device,
        dtype=activation_dtype(model, dtype),
        max_model_len=_max_model_len(config.max_model_len, model, tokenizer),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        quantization=quantization.description,
        cpu_weights=cpu_weights,
    )


def tensor_parallel_load(config: ModelConfig) -> dict[str, object]:
    """from_pretrained's tensor-parallel arguments for this process's rank ({} without tensor parallelism). Rank 0
    checked that the model splits (check_splittable) before the ranks started."""
    if config.tensor_parallel_size == 1:
        return {}
    if not torch.distributed.is_initialized():
        raise RuntimeError("a tensor-parallel model loads inside the ranks' process group (runner/parallel)")
    return tensor_parallel_arguments(config.tensor_parallel_size)


def _device_map(config: ModelConfig, device: torch.device, bitsandbytes: bool) -> str | dict[str, torch.device] | None:
    """accelerate's "auto" spreads layers over the GPUs; bitsandbytes quantizes as it places weights."""
    if config.device_map == "auto":
        if device.type != "cuda":
            raise ConfigError("--device-map auto spreads a model over GPUs: it needs --device cuda (or auto on a "
                              "machine with GPUs)")
        return "auto"
    return {"": device} if bitsandbytes else None


def _max_model_len(requested: int | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    model_limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not model_limit:
        tokenizer_limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer_limit and tokenizer_limit < _SANE_TOKENIZER_LIMIT:
            model_limit = int(tokenizer_limit)
    if requested is None:
        return int(model_limit or _FALLBACK_MAX_MODEL_LEN)
    if requested < 1:
        raise ConfigError(f"max_model_len must be positive, got {requested}")
    if model_limit and requested > model_limit:
        raise ConfigError(f"max_model_len {requested} exceeds the model's context window of {model_limit} tokens")
    return requested


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    return frozenset(int(token_id) for token_id in ids if token_id is not None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
