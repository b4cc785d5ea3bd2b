"""Where the benchmarked weights come from: an HF folder (or .gguf), or random-init llama shapes built on the device.

Random-init models (`--shape`) are built with `AutoModelForCausalLM.from_config` straight on the target device,
seeded, so every system gets identical weights (small normal values: transformers' own init, std 0.02). Their
token ids go up to vocab 128256, more than any small local tokenizer has, so they get `dummy_tokenizer`: a
word-level vocabulary of `<id>` tokens, enough for nitro_torch's detokenizer and grammar decoder.

Quantized random-init models (`--quantization bnb-4bit|bnb-8bit`) need a folder for `from_pretrained`: the model
is saved once (safetensors + the dummy tokenizer) under `--weights-dir` and reused by later runs.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nitro_torch.bench.options import QUANTIZATIONS, SHAPES

RANDOM_MAX_MODEL_LEN = 2048
_SAVED_MARKER = ".bench-complete"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, for the HF baselines (`path`) and for nitro_torch (`nitro_model`)."""

    path: str
    """An HF folder, or a .gguf file (loaded with transformers' GGUF reader: slow); "" for an unsaved random init."""
    name: str
    nitro_model: str
    """The value of nitro_torch's `model` option that loads the same weights ("" for an unsaved random init)."""
    dtype: torch.dtype
    device: str
    shape: str | None = None
    """Random-init shape (a `SHAPES` key), or None for real weights."""
    quantization: str = "none"
    seed: int = 0

    @property
    def built_in_memory(self) -> bool:
        """True when the weights are built on the device rather than loaded from `path`."""
        return self.shape is not None and not self.path


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=RANDOM_MAX_MODEL_LEN, bos_token_id=1,
                       eos_token_id=2)


def random_source(shape: str, device: str, quantization: str, seed: int, weights_dir: str | None) -> ModelSource:
    """A random-init source: bf16 on CUDA, fp32 on CPU; saved to a folder first when it is to be quantized."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = f"random-{shape}"
    if quantization == "none":
        return ModelSource("", name, "", dtype, device, shape, quantization, seed)
    folder = save_random_model(shape, dtype, device, seed, weights_dir)
    return ModelSource(str(folder), f"{name}-{quantization}", str(folder), dtype, device, shape, quantization, seed)


def random_model(source: ModelSource, attn_implementation: str) -> Any:
    """The seeded random-init model of `source.shape`, built directly on its device."""
    from transformers import AutoModelForCausalLM

    assert source.shape is not None
    torch.manual_seed(source.seed)
    with torch.device(source.device):
        model = AutoModelForCausalLM.from_config(
            llama_config(source.shape), dtype=source.dtype, attn_implementation=attn_implementation
        )
    model.eval()
    model.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=2)
def dummy_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer whose token i is `<i>` (ids 0/1/2 = unk/bos/eos): decodes any id < vocab_size."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<0>", bos_token="<1>", eos_token="<2>")


def save_random_model(shape: str, dtype: torch.dtype, device: str, seed: int, weights_dir: str | None) -> Path:
    """Save the random-init model (and its tokenizer) once; later runs with the same shape/dtype/seed reuse it."""
    root = Path(weights_dir) if weights_dir else Path(tempfile.gettempdir()) / "nitro_bench_weights"
    folder = root / f"{shape}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if (folder / _SAVED_MARKER).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"saving random-init {shape} to {folder} (once, for quantized loading) ...", flush=True)
    source = ModelSource("", shape, "", dtype, device, shape, "none", seed)
    model = random_model(source, "sdpa")
    model.save_pretrained(folder, safe_serialization=True)
    dummy_tokenizer(model.config.vocab_size).save_pretrained(folder)
    del model
    release_device_memory()
    (folder / _SAVED_MARKER).write_text("ok\n")
    return folder


def bnb_config(quantization: str, device: str, dtype: torch.dtype) -> Any:
    """The BitsAndBytesConfig nitro_torch's `quantization` option uses too: nf4 + double quant with bf16 compute
    on CUDA (the model's dtype elsewhere, so CPU matmuls stay float32), or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "bnb-4bit":
        compute = torch.bfloat16 if device == "cuda" else dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    if quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")


def _hf_location(path: str) -> tuple[str, dict[str, Any]]:
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def model_config(source: ModelSource) -> Any:
    """The HF config of the benchmarked model (for the roofline's dims)."""
    if source.shape is not None:
        return llama_config(source.shape)
    from transformers import AutoConfig

    folder, extra = _hf_location(source.path)
    return AutoConfig.from_pretrained(folder, **extra)


def load_tokenizer(source: ModelSource) -> Any:
    if source.shape is not None:
        return dummy_tokenizer(int(SHAPES[source.shape]["vocab_size"]))
    from transformers import AutoTokenizer

    folder, extra = _hf_location(source.path)
    return AutoTokenizer.from_pretrained(folder, **extra)


def load_hf_model(source: ModelSource, attn_implementation: str = "sdpa") -> Any:
    """The HF baselines' model: random init, a bnb-quantized folder (device_map: bnb quantizes while placing),
    or a plain folder moved to the device."""
    if source.built_in_memory:
        return random_model(source, attn_implementation)
    from transformers import AutoModelForCausalLM

    folder, extra = _hf_location(source.path)
    if source.quantization != "none":
        quantization = bnb_config(source.quantization, source.device, source.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=source.dtype, attn_implementation=attn_implementation, quantization_config=quantization,
            device_map={"": source.device}, **extra,
        )
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=source.dtype, attn_implementation=attn_implementation, **extra
    )
    return model.to(source.device).eval()  # type: ignore[arg-type]  # transformers' decorated `to` mistypes it


def nitro_random_loaded_model(source: ModelSource, attn_implementation: str) -> Any:
    """nitro_torch's LoadedModel around the random-init model (nitro's loader only reads folders)."""
    from nitro_torch.models.loader import LoadedModel

    model = random_model(source, attn_implementation)
    config = model.config
    return LoadedModel(
        model=model,
        tokenizer=dummy_tokenizer(config.vocab_size),
        name=source.name,
        source_path="(random init)",
        device=torch.device(source.device),
        dtype=source.dtype,
        max_model_len=RANDOM_MAX_MODEL_LEN,
        eos_token_ids=frozenset({int(config.eos_token_id)}),
    )


def release_device_memory() -> None:
    """Return freed blocks to the driver, so the next system (nitro sizes its KV cache by free memory) sees them."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
