"""`nitro-torch pull` and `nitro-torch models` as a user runs them (real processes, the loopback hub as
HF_ENDPOINT, a fresh HF_HOME), and the one-line errors with exit code 2 that pull and serve give."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nitro_torch.models.hub_errors import size_text
from tests.hub_models import GATED, HUGE, NOT_SERVED, TINY, TINY_GGUF, TOKEN, closed_port_url


def nitro(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nitro_torch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ}, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("nitro-torch: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0].removeprefix("nitro-torch: error: ")


def test_pull_then_models(hub) -> None:
    assert "no models yet" in nitro("models").stderr
    pulled = nitro("pull", TINY)
    assert pulled.returncode == 0, pulled.stderr
    commit = hub.repos[TINY].commit
    assert pulled.stdout.strip().endswith(f"models--loopback--tiny-llama/snapshots/{commit}")
    served = {name: data for name, data in hub.repos[TINY].files.items() if name not in NOT_SERVED}
    assert f"downloading {TINY} ({len(served)} files, {size_text(sum(map(len, served.values())))}) " in pulled.stderr
    assert "100%" in pulled.stderr  # the one bar
    assert nitro("pull", f"{TINY_GGUF}:Q8_0").returncode == 0

    listed = nitro("models")
    assert listed.returncode == 0
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert rows.keys() == {TINY, TINY_GGUF}
    assert " ".join(rows[TINY].split()[1:3]) == size_text(sum(map(len, served.values())))
    assert rows[TINY].endswith(f"yes (safetensors): {TINY}")
    assert rows[TINY_GGUF].endswith(f"yes (gguf): {TINY_GGUF}:Q8_0")
    as_json = json.loads(nitro("models", "--json").stdout)
    assert [(m["name"], m["servable"]) for m in as_json["models"]] == [(TINY, [TINY]),
                                                                       (TINY_GGUF, [f"{TINY_GGUF}:Q8_0"])]

    hub.forget()
    assert nitro("pull", TINY).returncode == 0  # up to date: the listing is asked for, no file again
    assert hub.downloads() == [] and [s.path for s in hub.seen] == [f"/api/models/{TINY}"]


def test_pull_takes_the_configured_model_and_keeps_a_cached_copy_when_the_hub_is_away(hub, tmp_path,
                                                                                       monkeypatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {TINY_GGUF}:q4_0\nport: 3928\n")
    monkeypatch.setenv("NITRO_CONFIG", str(config))  # as the Kubernetes init container runs it
    pulled = nitro("pull")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().endswith("tiny-llama-Q4_0.gguf")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    again = nitro("pull")
    assert again.returncode == 0 and "cannot reach the Hugging Face Hub" in again.stderr
    assert "using the cached copy" in again.stderr
    monkeypatch.delenv("NITRO_CONFIG")
    assert nitro("pull").stdout.startswith("nothing to pull: --model default is the embedded model")


def test_pull_with_a_token_file_for_a_gated_model(hub, tmp_path) -> None:
    token_file = tmp_path / "hf-token"
    token_file.write_text(TOKEN)
    assert nitro("pull", GATED, "--hf-token-file", str(token_file)).returncode == 0


@pytest.mark.parametrize(("model", "expected"), [
    (GATED, f"{GATED} is gated: accept its licence at {{url}}/{GATED} and set HF_TOKEN (or --hf-token-file)"),
    ("loopback/missing", "no model repository loopback/missing on {url} (check the name; a private one needs "
                         "HF_TOKEN or --hf-token-file)"),
    (f"{TINY_GGUF}:Q6_K", f"no Q6_K file in {TINY_GGUF}; quants there: Q4_0, Q4_K_M, Q8_0"),
    (HUGE, f"not enough disk space for {HUGE}: its files take 1000.0 TB and "),
    ("./not/a/hub/name", "'./not/a/hub/name' is a local path, not a hub model name"),
])
def test_pull_errors_are_one_line_and_exit_2(hub, model, expected) -> None:
    assert one_error_line(nitro("pull", model)).startswith(expected.format(url=hub.url))
    assert hub.downloads() == []


def test_no_network_and_offline_are_one_line_and_exit_2(hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert one_error_line(nitro("pull", TINY)).startswith("cannot reach the Hugging Face Hub at http://127.0.0.1:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not in the local Hugging Face cache" in one_error_line(nitro("pull", TINY))


def test_serve_exits_2_with_one_line_for_a_name_it_cannot_fetch(hub) -> None:
    message = one_error_line(nitro("serve", "--model", f"{TINY_GGUF}:Q6_K", "--port", "3999", timeout=300))
    assert message == f"no Q6_K file in {TINY_GGUF}; quants there: Q4_0, Q4_K_M, Q8_0"
