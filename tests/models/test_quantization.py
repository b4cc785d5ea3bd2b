"""--quantization with real bitsandbytes on the CPU: the config it builds, the layers it loads, pre-quantized
checkpoints, and the paged engine agreeing with HF's own forward over the same quantized weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nitro_torch.config import ConfigError, ModelConfig, build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import LoadedModel, load_model
from nitro_torch.models.quantization import (
    activation_dtype,
    bnb_config_for,
    checkpoint_quantization,
    compute_dtype,
    plan_quantization,
    quiet_int8_cast_warning,
)
from nitro_torch.runner.attention import register_paged_attention
from tests.engine_logits import greedy_with_logits

bnb = pytest.importorskip("bitsandbytes")

CPU = torch.device("cpu")
LINEAR = {"bnb-4bit": bnb.nn.Linear4bit, "bnb-8bit": bnb.nn.Linear8bitLt}
DESCRIPTIONS = {"bnb-4bit": "bnb-4bit nf4", "bnb-8bit": "bnb-8bit"}
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog because"
NEW_TOKENS = 8


def model_options(model: str, quantization: str = "none", **options: object) -> dict[str, object]:
    return {"model": model, "device": "cpu", "quantization": quantization, "num_kv_blocks": 64, **options}


def paged_engine(model: str, quantization: str = "none", **options: object) -> LLMEngine:
    config = build_config(model_options(model, quantization, **options), env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def hf_reference(model: str, quantization: str = "none", **options: object) -> LoadedModel:
    config = build_config(model_options(model, quantization, **options), env={})
    return load_model(config.model, attn_implementation="sdpa")


def hf_logits(loaded: LoadedModel, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """HF's forward over prompt + tokens: the logits predicting each of `tokens`."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1:]


def hf_greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=0)
    return out[0, len(prompt):].tolist()


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_floating_point()}


@pytest.fixture(scope="module")
def prompt(smol_tokenizer) -> list[int]:
    return list(smol_tokenizer.encode(PROMPT_TEXT))


# the config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_config(quant_type: str) -> None:
    config = bnb_config_for(ModelConfig(quantization="bnb-4bit", bnb_4bit_quant_type=quant_type),
                            torch.float32, CPU)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == quant_type
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.float32


def test_8bit_config() -> None:
    config = bnb_config_for(ModelConfig(quantization="bnb-8bit"), torch.float32, CPU)
    assert config.load_in_8bit and not config.load_in_4bit


def test_compute_dtype_is_bf16_on_cuda_else_the_model_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype(torch.float32, torch.device("cuda")) == torch.bfloat16
    assert compute_dtype(torch.float32, CPU) == torch.float32
    assert compute_dtype(torch.bfloat16, CPU) == torch.bfloat16


def test_options_parse_from_flags_and_env() -> None:
    config = build_config({"quantization": "bnb-4bit"}, env={"NITRO_BNB_4BIT_QUANT_TYPE": "fp4"})
    assert (config.model.quantization, config.model.bnb_4bit_quant_type) == ("bnb-4bit", "fp4")
    assert build_config(env={}).model.quantization == "none"
    with pytest.raises(ConfigError, match="quantization"):
        build_config({"quantization": "gptq"}, env={})


def test_plain_checkpoint_plans_nothing(tiny_model_dir: str) -> None:
    plan = plan_quantization(ModelConfig(model=tiny_model_dir), tiny_model_dir, torch.float32, CPU)
    assert (plan.config, plan.description, plan.bitsandbytes) == (None, "none", False)


def test_int8_cast_warning_is_dropped(caplog) -> None:
    quiet_int8_cast_warning()
    quiet_int8_cast_warning()  # idempotent
    source = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING):
        source.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        source.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert len(source.filters) == 1


# loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("quantization", "description"), [("bnb-4bit", "bnb-4bit nf4"), ("bnb-8bit", "bnb-8bit")])
def test_load_model_quantizes_the_linear_layers(tiny_model_dir: str, quantization: str, description: str) -> None:
    loaded = load_model(ModelConfig(model=tiny_model_dir, device="cpu", quantization=quantization))
    layer = loaded.model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(linear, LINEAR[quantization])
    assert not isinstance(loaded.model.lm_head, LINEAR[quantization])  # tied to the float embeddings
    assert loaded.dtype == torch.float32
    assert layer.self_attn.q_proj.weight.dtype in (torch.uint8, torch.int8)
    assert loaded.quantization == description
    assert loaded.device == CPU and all(p.device == CPU for p in loaded.model.parameters())


def test_fp4_and_bf16_activations(tiny_model_dir: str) -> None:
    loaded = load_model(ModelConfig(model=tiny_model_dir, device="cpu", dtype="bfloat16",
                                    quantization="bnb-4bit", bnb_4bit_quant_type="fp4"))
    assert loaded.quantization == "bnb-4bit fp4"
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16


def test_activation_dtype_ignores_integer_weights() -> None:
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(4, 2, dtype=torch.float16)  # type: ignore[method-assign]
    assert activation_dtype(model, torch.float32) == torch.float16  # type: ignore[arg-type]


# the engine against HF on the same quantized weights ------------------------------------------------------


@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_paged_engine_matches_hf_forward_on_quantized_weights(tiny_model_dir: str, prompt: list[int],
                                                              quantization: str) -> None:
    engine = paged_engine(tiny_model_dir, quantization)
    reference = hf_reference(tiny_model_dir, quantization)
    nitro, ref = quantized_state(engine.loaded.model), quantized_state(reference.model)
    assert nitro.keys() == ref.keys() and nitro
    assert all(torch.equal(nitro[k], ref[k]) for k in nitro), "quantizing the same folder twice differed"

    tokens, logits = greedy_with_logits(engine, prompt, NEW_TOKENS)
    expected = hf_logits(reference, prompt, tokens)
    assert logits.shape == expected.shape == (NEW_TOKENS, logits.shape[1])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)  # measured: ~3e-7
    assert tokens == hf_greedy(reference, prompt, NEW_TOKENS)


# pre-quantized checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["bnb-4bit", "bnb-8bit"])
def saved_quantized(request, tiny_model_dir: str, tmp_path_factory) -> tuple[str, str]:
    """The tiny model quantized at load and saved with save_pretrained (bnb serializes both on the CPU)."""
    loaded = load_model(ModelConfig(model=tiny_model_dir, device="cpu", quantization=request.param))
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder), request.param


def test_saved_checkpoint_is_detected_and_serves(saved_quantized: tuple[str, str], prompt: list[int]) -> None:
    folder, quantization = saved_quantized
    saved = checkpoint_quantization(folder)
    assert saved is not None and saved["quant_method"] == "bitsandbytes"
    engine = paged_engine(folder)  # --quantization none: loaded as it is
    suffix = " nf4" if quantization == "bnb-4bit" else ""
    assert engine.loaded.quantization == f"{quantization}{suffix} (pre-quantized checkpoint)"
    assert isinstance(engine.loaded.model.model.layers[1].mlp.gate_proj, LINEAR[quantization])
    assert engine.loaded.dtype == torch.float32

    tokens, logits = greedy_with_logits(engine, prompt, NEW_TOKENS)
    reference = hf_reference(folder)
    torch.testing.assert_close(logits, hf_logits(reference, prompt, tokens), atol=1e-4, rtol=1e-4)


def test_saved_checkpoint_with_the_same_method_loads(saved_quantized: tuple[str, str]) -> None:
    folder, quantization = saved_quantized
    loaded = load_model(ModelConfig(model=folder, device="cpu", quantization=quantization))
    assert loaded.quantization.endswith("(pre-quantized checkpoint)")


def test_saved_checkpoint_with_a_conflicting_method_is_refused(saved_quantized: tuple[str, str]) -> None:
    folder, quantization = saved_quantized
    other = "bnb-8bit" if quantization == "bnb-4bit" else "bnb-4bit"
    refusal = f"--quantization {other} conflicts with .*already quantized as {quantization}"
    with pytest.raises(ConfigError, match=refusal):
        load_model(ModelConfig(model=folder, device="cpu", quantization=other))


def test_other_quantization_methods_are_refused_for_bnb(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    plan = plan_quantization(ModelConfig(model=str(tmp_path)), str(tmp_path), torch.float32, CPU)
    assert (plan.config, plan.description, plan.bitsandbytes) == (None, "gptq (pre-quantized checkpoint)", False)
    with pytest.raises(ConfigError, match="already quantized as gptq"):
        plan_quantization(ModelConfig(quantization="bnb-4bit"), str(tmp_path), torch.float32, CPU)


# the real default model -----------------------------------------------------------------------------------


# the server ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_in_process_server_loads_quantized_weights(tiny_model_dir: str, quantization: str) -> None:
    """The server's own load path (model host, staging) with --quantization, through the official client."""
    from openai import OpenAI

    from nitro_torch.server.app import create_app
    from tests.server.conftest import serving

    config = build_config(model_options(tiny_model_dir, quantization, max_num_seqs=4), env={})
    app = create_app(config)
    with serving(app) as url:
        assert app.state.host.engine.info.quantization == DESCRIPTIONS[quantization]
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5, temperature=0, extra_body={"ignore_eos": True},
        )
    assert answer.usage.completion_tokens == 5 and answer.usage.prompt_tokens > 0
    assert answer.choices[0].finish_reason == "length"


# the real default model (the GGUF's converted folder) -----------------------------------------------------


@pytest.fixture
def quantized_server() -> Iterator[str]:
    """`nitro-torch serve --quantization bnb-4bit` as a subprocess on the default model; yields its /v1 URL."""
    from tests.server.conftest import server_process

    with server_process("--device", "cpu", "--quantization", "bnb-4bit", "--max-model-len", "1024",
                        "--kv-cache-memory", "0.1", "--log-level", "warning") as (_, base_url, _):
        yield base_url + "/v1"


@pytest.mark.slow
def test_server_with_4bit_weights_answers_the_openai_client(quantized_server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=quantized_server, api_key="unused", max_retries=0, timeout=120)
    [model] = client.models.list().data
    answer = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0,
    )
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 16
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
