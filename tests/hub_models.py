"""The repositories of the loopback hub (tests/hub_server.py) and the fixtures that point nitro_torch at it.

Import the fixtures into a test module (`from tests.hub_models import hub, hub_repos  # noqa: F401`). `hub` starts
a fresh hub with every repository, and sets the environment a user would: HF_ENDPOINT at the hub, HF_HOME and
NITRO_HOME in a temporary folder (an empty cache), no token, not offline. Server processes inherit it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import HubRepo, LoopbackHub

TINY = "loopback/tiny-llama"
TINY_GGUF = "loopback/tiny-llama-GGUF"
GATED = "loopback/gated-llama"
BIN_ONLY = "loopback/bin-only"
HUGE = "loopback/huge"
TOKEN = "hf_loopback_token"
NOT_SERVED = ("pytorch_model.bin", "onnx/model.onnx", "original/consolidated.pth", "README.md", ".gitattributes")
"""Files of TINY that serving does not need: never downloaded."""
GGUF_QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")
SPLIT_PARTS = ("tiny-llama-Q4_K_M-00001-of-00002.gguf", "tiny-llama-Q4_K_M-00002-of-00002.gguf")


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory, smol_tokenizer) -> dict[str, HubRepo]:
    """The repositories (built once per session): a tiny llama in two safetensors shards beside files of other
    formats, its GGUF quants (one split in two parts) beside a vision projector, a gated repository, one with
    .bin weights only, and one whose weights are larger than any disk."""
    from nitro_torch.models.embedded import embedded_gguf_path
    from tests.tiny_gguf import write_tiny_gguf
    from tests.tiny_models import save_tiny_model

    built = tmp_path_factory.mktemp("hub-repos")
    tiny = _folder_files(save_tiny_model(built / "tiny", smol_tokenizer, max_shard_size="4MB"))
    assert "model.safetensors.index.json" in tiny
    tiny.update({name: f"{name}: not a file serving needs\n".encode() for name in NOT_SERVED})

    quants = built / "gguf"
    quants.mkdir()
    for quant, kind, split in (("Q4_0", "Q4_0", 0), ("Q8_0", "Q8_0", 0), ("Q4_K_M", "Q4_0", 12)):
        write_tiny_gguf(quants / f"tiny-llama-{quant}.gguf", embedded_gguf_path(), quant=kind, seed=1,
                        split_max_tensors=split)
    gguf_files = _folder_files(quants)
    assert set(SPLIT_PARTS) <= set(gguf_files)
    gguf_files["mmproj-tiny-llama-F16.gguf"] = b"GGUF a vision projector, not a model"
    gguf_files["README.md"] = b"# tiny GGUF quants\n"

    small = {"config.json": b"{}", "model.safetensors": b"\0" * 4096, "tokenizer.json": b"{}"}
    return {repo.repo_id: repo for repo in (
        HubRepo(TINY, tiny),
        HubRepo(TINY_GGUF, gguf_files),
        HubRepo(GATED, dict(small), gated=True),
        HubRepo(BIN_ONLY, {"config.json": b"{}", "pytorch_model.bin": b"\0" * 4096, "tokenizer.json": b"{}"}),
        HubRepo(HUGE, dict(small), claimed_sizes={"model.safetensors": 10**15}),
    )}


@pytest.fixture
def hub(hub_repos, tmp_path, monkeypatch) -> Iterator[LoopbackHub]:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
                 "NITRO_MODEL", "NITRO_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("NITRO_HOME", str(tmp_path / "nitro"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with LoopbackHub(TOKEN) as server:
        for repo in hub_repos.values():
            server.add(HubRepo(repo.repo_id, dict(repo.files), repo.gated, dict(repo.claimed_sizes)))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def closed_port_url() -> str:
    """An endpoint where nothing listens: connections are refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
