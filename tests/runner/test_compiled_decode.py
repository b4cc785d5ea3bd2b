"""--compile-decode: the padded decode step through torch.compile gives the same greedy tokens as the eager engine,
and decode steps really take the compiled path (compiled once per padded batch size, at start-up)."""

from __future__ import annotations

from nitro_torch.bench.host_overhead import tiny_loaded_model
from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.sampling import SamplingParams

PROMPTS = [[100 + i * 7 + j * 13 for j in range(5 + 3 * i)] for i in range(3)]


def tiny_engine(tokenizer, compile_decode: bool) -> LLMEngine:  # noqa: ANN001
    """Untied random weights, so greedy decoding wanders over the vocabulary instead of repeating a token."""
    loaded = tiny_loaded_model(tokenizer, num_layers=2, tied=False, seed=1)
    options = {"device": "cpu", "num_kv_blocks": 64, "max_num_seqs": 4, "compile_decode": compile_decode}
    return LLMEngine(loaded, build_config(options, env={}))


def test_compiled_decode_gives_the_eager_tokens(smol_tokenizer) -> None:  # noqa: ANN001
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eager = tiny_engine(smol_tokenizer, compile_decode=False)
    assert eager.runner.graphs is None
    expected = eager.generate(PROMPTS, params)
    assert len({token for tokens in expected for token in tokens}) > 10  # not a degenerate repetition

    compiled = tiny_engine(smol_tokenizer, compile_decode=True)
    graphs = compiled.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4]
    runs = []
    original = graphs.run

    def counting(inputs):  # noqa: ANN001, ANN202
        runs.append(inputs.input_ids.shape[0])
        return original(inputs)

    graphs.run = counting  # type: ignore[method-assign]
    assert compiled.generate(PROMPTS, params) == expected
    assert runs and max(runs) == 3  # the decode steps of all three requests went through the compiled path
