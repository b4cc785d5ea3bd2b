import os

import pytest

from nitro_torch.cli import build_parser, config_from_args, main


@pytest.fixture(autouse=True)
def no_nitro_environment(monkeypatch):
    for name in os.environ:
        if name.startswith("NITRO_"):
            monkeypatch.delenv(name)


def test_serve_options_reach_the_config(tmp_path):
    config_file = tmp_path / "nitro.yaml"
    config_file.write_text("max-num-seqs: 8\nhost: 0.0.0.0\n")
    args = build_parser().parse_args(["serve", "--config", str(config_file), "--port", "4000",
                                      "--max-num-seqs", "32", "--no-prefix-caching"])
    config = config_from_args(args)
    assert config.server.port == 4000 and config.server.host == "0.0.0.0"
    assert config.scheduler.max_num_seqs == 32 and config.cache.prefix_caching is False


def test_defaults_are_nitros_port():
    assert config_from_args(build_parser().parse_args(["serve"])).server.port == 3928


def test_bad_values_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "nope"])
    assert info.value.code == 2 and "port" in capsys.readouterr().err


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        main([])


def test_a_model_that_is_not_there_exits_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "someorg/not-here", "--port", "3999"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "someorg/not-here" in err and "not in the local Hugging Face cache" in err and "Traceback" not in err
