"""The lean forward for packed CPU weights gives transformers' own forward's tokens over the same packed layers, on
every architecture it accepts; others keep transformers' forward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.cpu_weights import pack_cpu_weights
from nitro_torch.models.lean_decoder import SUPPORTED_MODEL_TYPES, LeanDecoder, lean_decoder_for
from nitro_torch.models.loader import LoadedModel
from nitro_torch.models.packed_linear import Int4Linear, Int8Linear
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams
from tests.runner.test_architectures import ARCHITECTURES, NEW_TOKENS, PROMPTS, tiny_model

CPU = torch.device("cpu")


def packed_engine(model_type: str, mode: str, smol_tokenizer, **options: object) -> LLMEngine:
    model = tiny_model(model_type, register_paged_attention())
    packed = pack_cpu_weights(model, mode, CPU, None, "none")
    assert packed.mode == mode and not packed.exact
    loaded = LoadedModel(model=model, tokenizer=smol_tokenizer, name=model_type, source_path="", device=CPU,
                         dtype=torch.float32, max_model_len=256, eos_token_ids=frozenset(), cpu_weights=packed)
    config = build_config({"max_num_batched_tokens": 32, "num_kv_blocks": 64, "block_size": 16,
                           "cpu_decode_compile": "off", **options}, env={})
    return LLMEngine(loaded, config)


def greedy(engine: LLMEngine) -> list[list[int]]:
    return engine.generate(PROMPTS, [SamplingParams(temperature=0.0, max_tokens=n) for n in NEW_TOKENS])


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_lean_forward_gives_transformers_tokens(model_type: str, smol_tokenizer) -> None:
    engine = packed_engine(model_type, "int4", smol_tokenizer)
    assert isinstance(engine.runner.forward, LeanDecoder)
    lean = greedy(engine)
    engine.runner.forward = engine.runner.model
    assert greedy(engine) == lean
    assert engine.stats().kv_blocks_used == 0


def test_lean_forward_one_request_at_a_time_equals_batched(smol_tokenizer) -> None:
    """A lone decode row attends without a mask (the single-user path); batched rows with one."""
    engine = packed_engine("mistral", "int4", smol_tokenizer)  # a sliding window of 12 < the longest context
    batched = greedy(engine)
    alone = [engine.generate([prompt], [SamplingParams(temperature=0.0, max_tokens=n)])[0]
             for prompt, n in zip(PROMPTS, NEW_TOKENS)]
    assert alone == batched


def test_int8_layers_run_through_the_lean_forward(smol_tokenizer) -> None:
    engine = packed_engine("llama", "int8", smol_tokenizer)
    assert isinstance(engine.runner.forward, LeanDecoder)
    assert all(isinstance(m, Int8Linear) for m in engine.runner.model.modules() if hasattr(m, "in_features"))
    lean = greedy(engine)
    engine.runner.forward = engine.runner.model
    assert greedy(engine) == lean


@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - SUPPORTED_MODEL_TYPES))
def test_other_architectures_keep_transformers_forward(model_type: str, smol_tokenizer) -> None:
    engine = packed_engine(model_type, "int4", smol_tokenizer)
    assert engine.runner.forward is engine.runner.model
    assert any(isinstance(m, Int4Linear) for m in engine.runner.model.modules())
    assert all(len(tokens) == n for tokens, n in zip(greedy(engine), NEW_TOKENS))


def test_float_weights_keep_transformers_forward() -> None:
    model = tiny_model("llama", register_paged_attention())
    assert lean_decoder_for(model) is None


def test_one_decoder_per_model_which_it_does_not_keep_alive() -> None:
    """Engines made again on a model share its decoder (and compiled step); a model switched away is freed."""
    model = tiny_model("llama", register_paged_attention())
    pack_cpu_weights(model, "int4", CPU, None, "none")
    decoder = lean_decoder_for(model)
    assert decoder is not None and lean_decoder_for(model) is decoder
    gone = weakref.ref(model)
    del model, decoder
    gc.collect()
    assert gone() is None
