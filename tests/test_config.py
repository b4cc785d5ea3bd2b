"""Options: one table feeds the YAML file, NITRO_* env and CLI flags, with file < env < flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nitro_torch.config import OPTIONS, Config, ConfigError, add_arguments, build_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_default_yaml_matches_built_in_defaults() -> None:
    assert build_config(env={}, config_file=ROOT / "configs" / "default.yaml") == build_config(env={})


def test_precedence_file_then_env_then_flag(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("port: 4000\nmax-num-seqs: 7\nprefix_caching: false\n")
    from_file = build_config(env={}, config_file=file)
    assert (from_file.server.port, from_file.scheduler.max_num_seqs, from_file.cache.prefix_caching) == (4000, 7, False)
    env = {"NITRO_PORT": "4001", "NITRO_MAX_NUM_SEQS": "9"}
    from_env = build_config(env=env, config_file=file)
    assert (from_env.server.port, from_env.scheduler.max_num_seqs) == (4001, 9)
    from_flag = build_config({"port": "4002"}, env=env, config_file=file)
    assert (from_flag.server.port, from_flag.scheduler.max_num_seqs) == (4002, 9)


def test_config_file_from_nitro_config(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("port: 4000\n")
    assert build_config(env={"NITRO_CONFIG": str(file)}).server.port == 4000
    other = tmp_path / "d.yaml"
    other.write_text("port: 4001\n")
    assert build_config(env={"NITRO_CONFIG": str(file)}, config_file=other).server.port == 4001


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("max-num-seq: 7\n")
    with pytest.raises(ConfigError, match="max-num-seq"):
        build_config(env={}, config_file=file)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"port": "70000"}, "port"), ({"block_size": "12"}, "power of two"), ({"dtype": "int3"}, "dtype"),
     ({"prefix_caching": "maybe"}, "prefix_caching"), ({"quantization": "bnb-3bit"}, "quantization"),
     ({"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type")],
)
def test_bad_values_are_rejected(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(options, env={})


def test_every_option_is_a_flag_with_its_default_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for option in OPTIONS.values():
        assert option.flag in help_text
        assert f"[default: {option.default}; env {option.env}]" in help_text
    args = parser.parse_args(["--no-prefix-caching", "--max-num-seqs", "3"])
    config = build_config(vars(args), env={})
    assert config.cache.prefix_caching is False and config.scheduler.max_num_seqs == 3
    assert Config() == build_config(env={})


def test_shipped_config_files_load() -> None:
    """Every file under configs/ names only real options with valid values (the model is not loaded)."""
    for file in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        config = build_config(env={}, config_file=file)
        assert config.server.port == 3928, file
    gpu = build_config(env={}, config_file=Path(__file__).resolve().parents[1] / "configs" / "gpu-8b-4bit.yaml")
    assert (gpu.model.quantization, gpu.model.device, gpu.runner.cuda_graphs) == ("bnb-4bit", "cuda", True)
