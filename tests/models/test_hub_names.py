"""Hub model names and the files serving them needs: pure functions, no network."""

from __future__ import annotations

import pytest

from nitro_torch.models.hub import plan_files
from nitro_torch.models.hub_errors import NoServableWeightsError, QuantNotFoundError, QuantRequiredError
from nitro_torch.models.hub_names import (
    HubName,
    gguf_models,
    hub_name_of,
    parse_hub_name,
    quant_tag,
    safetensors_files,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("Qwen/Qwen2.5-7B-Instruct", HubName("Qwen/Qwen2.5-7B-Instruct")),
    ("Qwen/Qwen2.5-7B-Instruct@v1.0", HubName("Qwen/Qwen2.5-7B-Instruct", "v1.0")),
    ("org/model@refs/pr/3", HubName("org/model", "refs/pr/3")),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", HubName("bartowski/Llama-3.2-1B-Instruct-GGUF", None, "Q4_K_M")),
    ("org/x-GGUF@0123456789abcdef0123456789abcdef01234567:q8_0",
     HubName("org/x-GGUF", "0123456789abcdef0123456789abcdef01234567", "q8_0")),
    ("hf.co/org/x-GGUF:IQ4_XS", HubName("org/x-GGUF", None, "IQ4_XS")),
    ("https://huggingface.co/org/model", HubName("org/model")),
    ("gpt2", HubName("gpt2")),
])
def test_names_parse(text: str, expected: HubName) -> None:
    assert parse_hub_name(text) == expected
    assert str(expected) == text.removeprefix("hf.co/").removeprefix("https://huggingface.co/")


@pytest.mark.parametrize("text", ["default", "none", "org/a--b", "org/a..b", "-org/x", "org/x.", "a/b/c", "org/x:",
                                  "org/x@", "org name/x", "org/x.git"])
def test_what_is_not_a_hub_name(text: str) -> None:
    assert parse_hub_name(text) is None


def test_paths_are_never_hub_names(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_name_of("org/local") is None  # an existing folder wins over the hub
    assert hub_name_of("org/elsewhere") == HubName("org/elsewhere")
    for path in ("./org/x", "/srv/org/x", "~/models/x", "model.gguf", "org/x.GGUF", "a/b/c"):
        assert hub_name_of(path) is None, path


def test_safetensors_models_download_config_tokenizer_and_weights_only() -> None:
    repo = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt",
            "vocab.json", "special_tokens_map.json", "chat_template.jinja", "additional_chat_templates/tool.jinja",
            "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "consolidated.safetensors", "pytorch_model.bin", "original/model.pth", "onnx/model.onnx", "README.md",
            ".gitattributes", "flax_model.msgpack", "tf_model.h5", "model.gguf", "LICENSE"]
    files = safetensors_files(repo)
    assert files is not None and files[-1] == "config.json"  # last: its presence marks a finished download
    assert set(files) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                          "merges.txt", "vocab.json", "special_tokens_map.json", "chat_template.jinja",
                          "additional_chat_templates/tool.jinja", "model.safetensors.index.json",
                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert safetensors_files(["config.json", "model.safetensors", "tokenizer.model"]) == \
        ["tokenizer.model", "model.safetensors", "config.json"]
    assert safetensors_files(["config.json", "pytorch_model.bin"]) is None
    assert safetensors_files(["model.safetensors"]) is None  # no config.json: not a transformers model


def test_gguf_quants_are_read_from_file_names() -> None:
    assert quant_tag("Llama-3.2-1B-Instruct-Q4_K_M") == "Q4_K_M"
    assert quant_tag("llama-2-7b.Q5_0") == "Q5_0"
    assert quant_tag("qwen2.5-7b-instruct-q4_k_m") == "Q4_K_M"
    assert quant_tag("Qwen3-8B-UD-Q4_K_XL") == "UD-Q4_K_XL"
    assert quant_tag("model-IQ2_XXS") == "IQ2_XXS"
    assert quant_tag("model-bf16") == "BF16"
    assert quant_tag("model") is None
    models = gguf_models(["Q8_0/big-Q8_0-00002-of-00002.gguf", "Q8_0/big-Q8_0-00001-of-00002.gguf",
                          "big-Q4_K_M.gguf", "mmproj-big-f16.gguf", "README.md"])
    assert [(m.quant, m.parts, m.complete) for m in models] == [
        ("Q8_0", ("Q8_0/big-Q8_0-00001-of-00002.gguf", "Q8_0/big-Q8_0-00002-of-00002.gguf"), True),
        ("Q4_K_M", ("big-Q4_K_M.gguf",), True),
    ]
    assert not gguf_models(["big-Q8_0-00001-of-00003.gguf"])[0].complete


def test_a_quant_picks_its_file_and_a_gguf_repository_defaults_to_q4_k_m() -> None:
    sizes = {name: 1 for name in ("m-Q4_0.gguf", "m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf",
                                  "m-Q4_K_S.gguf", "mmproj-m-f16.gguf", "README.md")}
    assert plan_files(HubName("o/m-GGUF", quant="q4_k_s"), sizes)[0] == ["m-Q4_K_S.gguf"]
    assert plan_files(HubName("o/m-GGUF", quant="Q4_0"), sizes)[0] == ["m-Q4_0.gguf"]
    assert plan_files(HubName("o/m-GGUF"), sizes)[0] == ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(QuantNotFoundError, match=r"^no Q5_K_M file in o/m-GGUF; quants there: Q4_0, Q4_K_M, Q4_K_S$"):
        plan_files(HubName("o/m-GGUF", quant="Q5_K_M"), sizes)
    with pytest.raises(QuantNotFoundError, match="no Q4_K file"):  # a tag matches whole words only
        plan_files(HubName("o/m-GGUF", quant="Q4_K"), sizes)
    with pytest.raises(QuantRequiredError, match=r"name one as o/two:QUANT \(quants there: Q5_0, Q8_0\)"):
        plan_files(HubName("o/two"), {"two-Q8_0.gguf": 1, "two-Q5_0.gguf": 1})
    assert plan_files(HubName("o/one"), {"one-Q8_0.gguf": 1})[0] == ["one-Q8_0.gguf"]
    with pytest.raises(NoServableWeightsError, match=r"^o/cut holds 1 of the 3 parts of cut-Q8_0.gguf$"):
        plan_files(HubName("o/cut", quant="Q8_0"), {"cut-Q8_0-00001-of-00003.gguf": 1})


def test_a_repository_without_servable_weights_says_what_it_has() -> None:
    with pytest.raises(NoServableWeightsError) as caught:
        plan_files(HubName("o/old"), {"config.json": 1, "pytorch_model-00001-of-00002.bin": 1,
                                      "pytorch_model-00002-of-00002.bin": 1, "tf_model.h5": 1})
    assert str(caught.value) == ("o/old has no servable weights: nitro_torch needs config.json with "
                                 "model.safetensors (or model.safetensors.index.json and its shards), or GGUF files; "
                                 "the repository has: pytorch_model-*-of-00002.bin, tf_model.h5")
    with pytest.raises(NoServableWeightsError, match="needs a GGUF file for Q4_K_M"):
        plan_files(HubName("o/new", quant="Q4_K_M"), {"config.json": 1, "model.safetensors": 1})
