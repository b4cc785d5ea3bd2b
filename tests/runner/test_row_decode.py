"""--cpu-decode-compile: a request decoding alone over packed CPU weights runs the torch.compile'd lean step, whose
logits are the eager step's up to bf16 rounding (its fused loops round differently); batches, prefills and float
weights keep the eager forward; a background compilation serves eagerly until it swaps the compiled step in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nitro_torch.engine.engine import LLMEngine
from nitro_torch.runner.model_runner import ModelRunner
from nitro_torch.runner.row_decode import key_slots
from nitro_torch.sampling import SamplingParams
from tests.runner.test_architectures import PROMPTS, tiny_model
from tests.runner.test_lean_decoder import CPU, packed_engine

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class StepComparison:
    """Runs every step of the engine's runner twice, eagerly and as served, and keeps both logits of each step
    that had a single decode row."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.compiled_steps = 0
        self.scattered_steps = 0
        """Compared steps whose request's blocks do not follow each other (its keys come through its block table)."""
        self._execute = runner.execute
        runner.execute = self.execute  # type: ignore[method-assign]
        assert runner.row_decode is not None
        self._logits = runner.row_decode.logits
        runner.row_decode.logits = self.count  # type: ignore[method-assign]

    def count(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        self.compiled_steps += 1
        return self._logits(*inputs)

    def execute(self, step, previous=None):  # noqa: ANN001, ANN201
        row_decode = self.runner.row_decode
        assert row_decode is not None
        row_decode.ready = False
        eager, _ = self._execute(step, previous)
        row_decode.ready = True
        served, rows = self._execute(step, previous)
        inputs = self.runner.last_inputs
        if served is not None and inputs is not None and inputs.is_pure_decode and inputs.num_decodes == 1:
            self.pairs.append((eager.clone(), served.clone()))
            self.scattered_steps += inputs.decode_first_block is None
        return served, rows

    def assert_close(self) -> None:
        assert self.pairs
        for eager, served in self.pairs:
            assert served.shape == eager.shape
            scale = eager.abs().max().item()
            assert (served - eager).abs().max().item() <= 0.02 * scale + 1e-3
            top2 = eager[0].topk(2).values
            if (top2[0] - top2[1]).item() > 0.05 * scale:  # no near-tie: the same greedy token
                assert served.argmax().item() == eager.argmax().item()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3"])  # plain; a sliding window of 12; q/k norms
def test_compiled_step_gives_the_eager_logits_up_to_bf16_rounding(model_type: str, smol_tokenizer) -> None:
    engine = packed_engine(model_type, "int4", smol_tokenizer, cpu_decode_compile="startup")
    row_decode = engine.runner.row_decode
    assert row_decode is not None and row_decode.ready and row_decode.error is None
    comparison = StepComparison(engine.runner)
    for prompt in PROMPTS:
        assert len(engine.generate([prompt], PARAMS)[0]) == PARAMS.max_tokens
    assert len(comparison.pairs) == len(PROMPTS) * (PARAMS.max_tokens - 1)  # every decode step, compiled
    assert comparison.compiled_steps == len(comparison.pairs)
    assert comparison.pairs[0][1].shape == (1, engine.runner.model.config.vocab_size)
    comparison.assert_close()


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])  # the default for packed weights: float16
def test_compiled_step_reads_and_writes_every_kv_cache_dtype(kv_cache_dtype: str, smol_tokenizer) -> None:
    engine = packed_engine("llama", "int4", smol_tokenizer, cpu_decode_compile="startup", kv_cache_dtype=kv_cache_dtype)
    assert engine.runner.kv_cache.layout.dtype == getattr(torch, kv_cache_dtype)
    comparison = StepComparison(engine.runner)
    assert len(engine.generate([PROMPTS[1]], PARAMS)[0]) == PARAMS.max_tokens
    assert comparison.compiled_steps == len(comparison.pairs) == PARAMS.max_tokens - 1
    comparison.assert_close()


def test_a_request_with_scattered_blocks_attends_through_its_block_table(smol_tokenizer) -> None:
    """Two requests grow side by side, so each one's third block does not follow its second; the longer one then
    decodes alone, compiled, and its keys come from the slots of its block table."""
    engine = packed_engine("llama", "int4", smol_tokenizer, cpu_decode_compile="startup")
    comparison = StepComparison(engine.runner)
    lengths = [20, 30]  # blocks [0, 1, 4] and [2, 3, 5]
    outputs = engine.generate([list(range(100, 120)), list(range(200, 218))],
                              [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths])
    assert [len(tokens) for tokens in outputs] == lengths
    assert comparison.scattered_steps > 0 and comparison.compiled_steps == len(comparison.pairs)
    comparison.assert_close()


def test_key_slots_follow_the_block_table() -> None:
    table = np.array([5, 2, 9, 0])  # past its own blocks a row holds 0: the padding
    assert key_slots(table, 35, None, 16).tolist() == [*range(80, 96), *range(32, 48), 144, 145, 146]
    assert key_slots(table, 35, 5, 16).tolist() == list(range(80, 115))  # blocks 5, 6, 7 follow each other


def test_batches_and_prefills_keep_the_eager_forward(smol_tokenizer) -> None:
    engine = packed_engine("llama", "int4", smol_tokenizer, cpu_decode_compile="startup")
    comparison = StepComparison(engine.runner)
    lengths = [4, 12]  # two requests decode together, then the longer one alone
    outputs = engine.generate(PROMPTS[:2], [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                            for n in lengths])
    assert [len(tokens) for tokens in outputs] == lengths
    assert comparison.compiled_steps == len(comparison.pairs) > 0
    assert comparison.compiled_steps < sum(lengths) - 2  # the shared steps ran eagerly


def test_background_compilation_serves_eagerly_meanwhile(smol_tokenizer) -> None:
    engine = packed_engine("llama", "int4", smol_tokenizer, cpu_decode_compile="background")
    row_decode = engine.runner.row_decode
    assert row_decode is not None
    assert len(engine.generate([PROMPTS[0]], PARAMS)[0]) == PARAMS.max_tokens  # compiled or not yet: it answers
    assert row_decode.wait(timeout=600) and row_decode.seconds is not None
    comparison = StepComparison(engine.runner)
    assert len(engine.generate([PROMPTS[1]], PARAMS)[0]) == PARAMS.max_tokens
    assert comparison.compiled_steps == PARAMS.max_tokens - 1


def test_off_and_float_weights_compile_nothing(smol_tokenizer) -> None:
    assert packed_engine("llama", "int4", smol_tokenizer, cpu_decode_compile="off").runner.row_decode is None
    from nitro_torch.config import build_config
    from nitro_torch.models.loader import LoadedModel
    from nitro_torch.runner.attention import register_paged_attention

    model = tiny_model("llama", register_paged_attention())
    loaded = LoadedModel(model=model, tokenizer=smol_tokenizer, name="llama", source_path="", device=CPU,
                         dtype=torch.float32, max_model_len=256, eos_token_ids=frozenset())
    engine = LLMEngine(loaded, build_config({"num_kv_blocks": 64, "cpu_decode_compile": "startup"}, env={}))
    assert engine.runner.row_decode is None and engine.info.row_decode_compile == "off"
