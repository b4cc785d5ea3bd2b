"""Model resolution, one-time GGUF conversion and loading (CPU; ~40 s, dominated by the one GGUF conversion)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nitro_torch.config import ConfigError, ModelConfig
from nitro_torch.models import embedded
from nitro_torch.models.embedded import DEFAULT_MODEL_NAME, convert_gguf, converted_dir_for, embedded_gguf_path
from nitro_torch.models.loader import (
    ModelNotFoundError,
    has_chat_template,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def nitro_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nitro_cache")


@pytest.fixture(scope="session")
def gguf_reference() -> dict:
    """What the conversion loaded straight from the GGUF, kept so the slow GGUF read happens only once."""
    return {}


@pytest.fixture(scope="session")
def converted_default(nitro_cache, gguf_reference) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        for auto_class, key in ((AutoModelForCausalLM, "model"), (AutoTokenizer, "tokenizer")):
            patch.setattr(auto_class, "from_pretrained", _capturing(auto_class.from_pretrained, gguf_reference, key))
        path, name = resolve_model_source("default", str(nitro_cache))
    assert name == DEFAULT_MODEL_NAME
    assert set(gguf_reference) == {"model", "tokenizer"}, "the default model was not converted from its GGUF"
    return Path(path)


def _capturing(load, store: dict, key: str):
    def load_and_keep(*args, **kwargs):
        loaded = load(*args, **kwargs)
        if kwargs.get("gguf_file"):
            store[key] = loaded
        return loaded

    return load_and_keep


@pytest.fixture(scope="session")
def loaded_default(converted_default, nitro_cache):
    return load_model(ModelConfig(model_cache_dir=str(nitro_cache)))


@pytest.fixture
def offline_empty_hf_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf_home" / "hub"


def test_conversion_writes_a_complete_plain_hf_folder(converted_default):
    names = {p.name for p in converted_default.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= names
    config = json.loads((converted_default / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    leftovers = [p.name for p in converted_default.parent.iterdir() if p != converted_default]
    assert leftovers == []  # no temp dirs beside it


def test_second_resolve_reuses_the_converted_folder(converted_default, nitro_cache, monkeypatch):
    mtime_before = converted_default.stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    path, _ = resolve_model_source("default", str(nitro_cache))
    assert Path(path) == converted_default
    assert converted_default.stat().st_mtime_ns == mtime_before


def test_gguf_path_source_shares_the_cache(converted_default, nitro_cache, monkeypatch):
    monkeypatch.setattr(embedded, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    path, name = resolve_model_source(str(embedded_gguf_path()), str(nitro_cache))
    assert Path(path) == converted_default
    assert name == "SmolLM2-135M-Instruct.Q4_1"


def test_converted_model_generates_exactly_like_the_gguf(loaded_default, gguf_reference):
    def greedy(model, tokenizer) -> list[int]:
        inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return output[0].tolist()

    expected = greedy(gguf_reference["model"].eval(), gguf_reference["tokenizer"])
    assert greedy(loaded_default.model, loaded_default.tokenizer) == expected
    assert "Paris" in loaded_default.tokenizer.decode(expected)


def test_load_model_fields(loaded_default, converted_default):
    assert loaded_default.name == DEFAULT_MODEL_NAME
    assert loaded_default.source_path == str(converted_default)
    assert (loaded_default.device, loaded_default.dtype) == (torch.device("cpu"), torch.float32)
    assert loaded_default.max_model_len == 8192
    assert loaded_default.eos_token_ids == frozenset({2})
    assert not loaded_default.model.training
    assert not any(p.requires_grad for p in loaded_default.model.parameters())
    assert has_chat_template(loaded_default.tokenizer)
    assert loaded_default.tokenizer.eos_token == "<|im_end|>"


def test_served_name_and_max_model_len_options(converted_default):
    loaded = load_model(ModelConfig(model=str(converted_default), served_model_name="smol", max_model_len=1024))
    assert (loaded.name, loaded.max_model_len) == ("smol", 1024)
    with pytest.raises(ConfigError, match="exceeds"):
        load_model(ModelConfig(model=str(converted_default), max_model_len=100_000))


def test_local_folder_source(converted_default):
    assert resolve_model_source(str(converted_default)) == (str(converted_default), converted_default.name)
    tokenizer = load_tokenizer(str(converted_default))
    assert tokenizer.eos_token_id == 2 and has_chat_template(tokenizer)


def test_bad_local_sources(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_source(str(tmp_path / "not_a_model"))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model_source(str(tmp_path / "missing_folder"))


def test_uncached_hub_name_under_hf_hub_offline_explains_how_to_fix(offline_empty_hf_home, monkeypatch):
    """HF_HUB_OFFLINE=1: a hub name missing from the cache is not downloaded (without it, it is: see
    test_hub_download.py), and the error says how to get it there."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # had the hub been asked, the error would say so
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_source("HuggingFaceTB/SmolLM2-360M-Instruct")
    message = str(caught.value)
    assert "not in the local Hugging Face cache" in message and "\n" not in message
    assert str(offline_empty_hf_home) in message
    assert "offline" in message and "hf download HuggingFaceTB/SmolLM2-360M-Instruct" in message
    assert "nitro-torch pull HuggingFaceTB/SmolLM2-360M-Instruct" in message
    assert "--model" in message


def test_cached_hub_id_is_found_offline(offline_empty_hf_home, converted_default):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_empty_hf_home / "models--testorg--tiny-llama"
    snapshot = repo / "snapshots" / commit
    tokenizer = AutoTokenizer.from_pretrained(converted_default)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    assert resolve_model_source("testorg/tiny-llama") == (str(snapshot), "testorg/tiny-llama")
    loaded = load_model(ModelConfig(model="testorg/tiny-llama"))
    assert (loaded.name, loaded.max_model_len, loaded.eos_token_ids) == ("testorg/tiny-llama", 512, frozenset({2}))
    output = loaded.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 6)


def test_changed_gguf_file_gets_a_new_cache_folder(tmp_path):
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF-one")
    first = converted_dir_for(gguf_file, tmp_path / "cache")
    os.utime(gguf_file, ns=(1_000_000_000, 1_000_000_000))
    second = converted_dir_for(gguf_file, tmp_path / "cache")
    assert first != second and first.parent == second.parent == tmp_path / "cache" / "converted"
    assert second.name.startswith("tiny-")


def test_conversion_race_loser_uses_the_winners_folder(tmp_path, monkeypatch):
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF")
    target = tmp_path / "out" / "tiny"

    def write_while_another_process_wins(source, folder, say, show_bars):
        (folder / "config.json").write_text("{}")
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(embedded, "_write_hf_folder", write_while_another_process_wins)
    assert convert_gguf(gguf_file, target, progress=False) == target
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tiny"]
    assert json.loads((target / "config.json").read_text()) == {"winner": True}


def test_crashed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF")

    def crash(source, folder, say, show_bars):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "_write_hf_folder", crash)
    with pytest.raises(RuntimeError):
        convert_gguf(gguf_file, tmp_path / "out" / "tiny", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NITRO_HOME", str(tmp_path / "env"))
    assert embedded.nitro_cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert embedded.nitro_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("NITRO_HOME")
    assert embedded.nitro_cache_dir() == Path.home() / ".cache" / "nitro_torch"


def test_resolve_device_and_dtype(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("bfloat16", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    with pytest.raises(ConfigError):
        resolve_dtype("int8", cpu)
