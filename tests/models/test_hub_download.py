"""Fetching hub models from a hub on loopback (tests/hub_server.py) with the real huggingface_hub client, into a
fresh Hugging Face cache: what is downloaded, what is found later without the network, resuming, and each error
a user can meet, as the one line they read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nitro_torch.models import hub_errors
from nitro_torch.models.hub import fetch_model
from nitro_torch.models.hub_cache import find_cached, hf_hub_cache_dir, repo_folder
from nitro_torch.models.hub_names import HubName
from tests.hub_models import BIN_ONLY, GATED, HUGE, NOT_SERVED, SPLIT_PARTS, TINY, TINY_GGUF, TOKEN, closed_port_url

SHARD = "model-00001-of-00002.safetensors"
HF_CHUNK = 10 * 1024 * 1024  # huggingface_hub writes what it receives in chunks of this size


def snapshot_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_a_model_downloads_what_serving_needs_once_and_is_then_found_without_the_network(hub) -> None:
    folder = fetch_model(TINY)
    repo = hub.repos[TINY]
    assert folder == repo_folder(TINY) / "snapshots" / repo.commit
    expected = set(repo.files) - set(NOT_SERVED)
    assert snapshot_files(folder) == expected
    assert all((folder / name).read_bytes() == repo.files[name] for name in expected)
    assert (repo_folder(TINY) / "refs" / "main").read_text() == repo.commit
    assert [s.path.rsplit("/", 1)[1] for s in hub.downloads()][-1] == "config.json"  # last, once all else is there
    assert not any(s.path.endswith(NOT_SERVED) for s in hub.seen)

    hub.forget()
    assert fetch_model(TINY) == folder
    assert hub.seen == []  # the cache answered: not a single request


def test_a_dropped_connection_resumes_where_it_stopped(hub) -> None:
    hub.cut_after[SHARD] = [HF_CHUNK + 4096]  # the connection drops after the first chunk reached the disk
    folder = fetch_model(TINY)
    data = hub.repos[TINY].files[SHARD]
    assert hashlib.sha256((folder / SHARD).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [s.range for s in hub.downloads(SHARD)] == [None, f"bytes={HF_CHUNK}-"]


def test_an_interrupted_download_is_not_served_and_a_rerun_fetches_only_what_is_missing(hub) -> None:
    hub.fail_gets["model-00002-of-00002.safetensors"] = 1
    with pytest.raises(hub_errors.DownloadError, match=rf"^downloading {TINY} from {hub.url} failed: "):
        fetch_model(TINY)
    snapshot = repo_folder(TINY) / "snapshots" / hub.repos[TINY].commit
    assert not (snapshot / "config.json").exists() and not (repo_folder(TINY) / "refs" / "main").exists()
    assert find_cached(HubName(TINY)) is None
    first_run = [s.path.rsplit("/", 1)[1] for s in hub.downloads()]
    fetched = snapshot_files(snapshot)
    assert "model-00002-of-00002.safetensors" in first_run and "tokenizer.json" in fetched

    assert fetch_model(TINY) == snapshot
    rerun = [s.path.rsplit("/", 1)[1] for s in hub.downloads()][len(first_run):]
    assert set(rerun) == set(hub.repos[TINY].files) - set(NOT_SERVED) - fetched  # only what was missing
    assert snapshot_files(snapshot) == set(hub.repos[TINY].files) - set(NOT_SERVED)


def test_a_gated_model_needs_a_token_with_access(hub, tmp_path, monkeypatch) -> None:
    with pytest.raises(hub_errors.GatedRepoError) as caught:
        fetch_model(GATED)
    assert str(caught.value) == (f"{GATED} is gated: accept its licence at {hub.url}/{GATED} and set HF_TOKEN "
                                 "(or --hf-token-file)")
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(hub_errors.GatedRepoError, match=f"has no access to it: accept its licence at {hub.url}"):
        fetch_model(GATED)
    monkeypatch.delenv("HF_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    folder = fetch_model(GATED, hf_token_file=str(token_file))
    assert folder is not None and (folder / "model.safetensors").is_file()
    sent = {s.authorization for s in hub.seen if "/resolve/" in s.path}
    assert sent == {"Bearer hf_someone_else", f"Bearer {TOKEN}"}  # without a token, none was tried


@pytest.mark.parametrize(("model", "error", "message"), [
    ("loopback/no-such-model", hub_errors.RepoNotFoundError,
     "no model repository loopback/no-such-model on {url} (check the name; a private one needs HF_TOKEN or "
     "--hf-token-file)"),
    (f"{TINY}@v9", hub_errors.RevisionNotFoundError, f"{TINY} has no revision 'v9' on {{url}}"),
    (f"{TINY_GGUF}:Q5_K_M", hub_errors.QuantNotFoundError,
     f"no Q5_K_M file in {TINY_GGUF}; quants there: Q4_0, Q4_K_M, Q8_0"),
    (BIN_ONLY, hub_errors.NoServableWeightsError,
     f"{BIN_ONLY} has no servable weights: nitro_torch needs config.json with model.safetensors (or "
     "model.safetensors.index.json and its shards), or GGUF files; the repository has: pytorch_model.bin"),
])
def test_names_that_cannot_be_served_say_why_before_any_download(hub, model, error, message) -> None:
    with pytest.raises(error) as caught:
        fetch_model(model)
    assert str(caught.value) == message.format(url=hub.url)
    assert "\n" not in str(caught.value)
    assert hub.downloads() == [] and not (hf_hub_cache_dir() / "models--loopback--bin-only").exists()


def test_not_enough_disk_is_found_before_the_first_byte(hub) -> None:
    with pytest.raises(hub_errors.NotEnoughDiskError) as caught:
        fetch_model(HUGE)
    assert str(caught.value).startswith(f"not enough disk space for {HUGE}: its files take 1000.0 TB and ")
    assert "free (free some, or point HF_HOME / HF_HUB_CACHE elsewhere)" in str(caught.value)
    assert [s.method for s in hub.seen] == ["GET"] and hub.seen[0].path.startswith("/api/models/")


def test_no_network_and_offline_mode(hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(hub_errors.HubUnreachableError, match=r"^cannot reach the Hugging Face Hub at http://127"):
        fetch_model(TINY)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub_errors.HubOfflineError) as caught:
        fetch_model(TINY)
    assert f"not in the local Hugging Face cache at {hf_hub_cache_dir()}, and HF_HUB_OFFLINE" in str(caught.value)
    assert hub.seen == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    folder = fetch_model(TINY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert fetch_model(TINY) == folder  # offline, from the cache


def test_a_quant_downloads_its_file_only(hub) -> None:
    path = fetch_model(f"{TINY_GGUF}:q8_0")
    assert path is not None and path.name == "tiny-llama-Q8_0.gguf"
    assert path.read_bytes() == hub.repos[TINY_GGUF].files["tiny-llama-Q8_0.gguf"]
    assert [s.path.rsplit("/", 1)[1] for s in hub.downloads()] == ["tiny-llama-Q8_0.gguf"]
    from nitro_torch.models.loader import gguf_file_of

    assert gguf_file_of(f"{TINY_GGUF}:q8_0") == path  # what --cpu-weights reads the GGUF blocks from


def test_the_default_quant_is_q4_k_m_whose_split_parts_are_joined_and_converted(hub) -> None:
    import gguf
    import torch

    from nitro_torch.config import ModelConfig
    from nitro_torch.models.loader import gguf_file_of, load_model, resolve_model_source

    folder, name = resolve_model_source(TINY_GGUF)
    assert name == TINY_GGUF
    assert sorted(s.path.rsplit("/", 1)[1] for s in hub.downloads()) == list(SPLIT_PARTS)
    merged = gguf_file_of(TINY_GGUF)
    assert merged is not None and merged.parent.name == "merged"
    joined = gguf.GGUFReader(str(merged))
    parts = [gguf.GGUFReader(str(path)) for path in sorted(merged.parents[2].glob("hf/hub/*/snapshots/*/*.gguf"))]
    assert len(parts) == 2
    assert [t.name for t in joined.tensors] == [t.name for part in parts for t in part.tensors]
    assert not any(key.startswith("split.") for key in joined.fields)
    assert json.loads((Path(folder) / "nitro_conversion.json").read_text())["source"] == str(merged)

    loaded = load_model(ModelConfig(model=TINY_GGUF, device="cpu", cpu_weights="fp32"))
    assert loaded.name == TINY_GGUF and loaded.source_path == folder
    output = loaded.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 6)
