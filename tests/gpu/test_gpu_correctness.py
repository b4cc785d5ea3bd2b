"""On CUDA: nitro's paged engine against HF on the same weights — fp32 greedy tokens, bf16 logits, and bnb
4/8-bit logits. Random-init llama by default (no downloads, seconds); NITRO_GPU_TEST_MODEL=default (or an HF
folder) runs the same checks on a real model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model, resolve_model_source
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams
from tests.engine_logits import greedy_with_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
PROMPT_LENGTHS = [5, 17, 33, 64]
NEW_TOKENS = 16
# bf16 rounding of activations differs between kernels (paged attention vs sdpa, fused vs unfused):
# relative to logits of order 1 this stays well under a few percent.
BF16_TOLERANCE = {"atol": 6e-2, "rtol": 5e-2}
# bnb int8 picks outlier columns (|x| > 6) per batch, so a 1-row decode and a T-row forward can round apart.
BNB_TOLERANCE = {"bnb-4bit": {"atol": 6e-2, "rtol": 5e-2}, "bnb-8bit": {"atol": 1.5e-1, "rtol": 1e-1}}


def save_random_llama(folder: Path, tokenizer, hidden: int = 512, layers: int = 4, heads: int = 8,
                      kv_heads: int = 2, head_dim: int = 64, vocab: int = 4096, seed: int = 0) -> Path:
    """A random-init llama (weights of no meaning; shapes that exercise GQA and several layers) as an HF folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> str:
    choice = os.environ.get("NITRO_GPU_TEST_MODEL", "random")
    if choice == "random":
        return str(save_random_llama(tmp_path_factory.mktemp("gpu-llama"), smol_tokenizer))
    return resolve_model_source(choice)[0]


@pytest.fixture(scope="module")
def prompts(model_dir: str) -> list[list[int]]:
    size = _vocab_size(model_dir)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _vocab_size(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("text_config", config)["vocab_size"])


def options(model_dir: str, dtype: str, quantization: str = "none") -> dict[str, object]:
    return {"model": model_dir, "device": DEVICE, "dtype": dtype, "quantization": quantization,
            "num_kv_blocks": 256, "max_num_seqs": 8, "max_num_batched_tokens": 512}


def nitro_engine(model_dir: str, dtype: str, quantization: str = "none") -> LLMEngine:
    config = build_config(options(model_dir, dtype, quantization), env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def hf_model(model_dir: str, dtype: str, quantization: str = "none"):
    config = build_config(options(model_dir, dtype, quantization), env={})
    return load_model(config.model, attn_implementation="sdpa").model


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def hf_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """HF's forward, teacher-forced on the same tokens: the logits predicting each of them."""
    ids = torch.tensor([prompt + tokens[:-1]], device=DEVICE)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float().cpu()
    return logits[len(prompt) - 1:]


def test_fp32_greedy_tokens_equal_hf_generate(model_dir: str, prompts: list[list[int]]) -> None:
    engine = nitro_engine(model_dir, "float32")
    assert engine.device.type == "cuda" and engine.loaded.dtype == torch.float32
    got = engine.generate(prompts, greedy(NEW_TOKENS))  # one continuous batch, prompts of mixed lengths
    reference = hf_model(model_dir, "float32")
    expected = []
    for prompt in prompts:
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    assert got == expected


def test_bf16_logits_close_to_hf_sdpa(model_dir: str, prompts: list[list[int]]) -> None:
    engine = nitro_engine(model_dir, "bfloat16")
    assert engine.loaded.dtype == torch.bfloat16
    reference = hf_model(model_dir, "bfloat16")
    for prompt in prompts:
        tokens, logits = greedy_with_logits(engine, prompt, NEW_TOKENS)
        torch.testing.assert_close(logits, hf_logits(reference, prompt, tokens), **BF16_TOLERANCE)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_bnb_logits_close_to_hf_on_the_same_quantized_weights(model_dir: str, prompts: list[list[int]],
                                                              quantization: str) -> None:
    import bitsandbytes as bnb

    engine = nitro_engine(model_dir, "bfloat16", quantization)
    layer = engine.loaded.model.model.layers[0]
    expected_linear = bnb.nn.Linear4bit if quantization == "bnb-4bit" else bnb.nn.Linear8bitLt
    assert isinstance(layer.mlp.down_proj, expected_linear)
    assert layer.mlp.down_proj.weight.device.type == "cuda"
    assert engine.loaded.dtype == torch.bfloat16
    if quantization == "bnb-4bit":
        assert layer.mlp.down_proj.compute_dtype == torch.bfloat16
    reference = hf_model(model_dir, "bfloat16", quantization)
    for prompt in prompts:
        tokens, logits = greedy_with_logits(engine, prompt, NEW_TOKENS)
        torch.testing.assert_close(logits, hf_logits(reference, prompt, tokens), **BNB_TOLERANCE[quantization])
