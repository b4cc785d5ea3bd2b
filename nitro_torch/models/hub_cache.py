"""The standard Hugging Face cache, read without the network: where a hub model's snapshot is, whether it is
complete enough to serve, and what the cache holds (`nitro-torch models`).

Layout (huggingface_hub's): <cache>/models--ORG--NAME/{refs/<revision>, snapshots/<commit>/<files>, blobs/}. A
file appears in a snapshot only once fully downloaded; nitro_torch downloads config.json last, so a snapshot with
config.json and every weight shard is a finished download.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nitro_torch.models.hub_names import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_WEIGHTS_FILE,
    GgufModel,
    HubName,
    gguf_models,
    matching_gguf,
    weight_formats,
)

_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_FOLDER_PREFIX = "models--"


def hf_hub_cache_dir() -> Path:
    """Read at call time: huggingface_hub freezes its constants at import, which would ignore later env changes."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hf_hub_cache_dir()) / (_REPO_FOLDER_PREFIX + repo_id.replace("/", "--"))


def cached_commit(repo_id: str, revision: str, cache: Path | None = None) -> str | None:
    """The commit a revision names in the cache: itself for a commit hash, else what refs/<revision> says."""
    if _COMMIT.fullmatch(revision):
        return revision
    try:
        return (repo_folder(repo_id, cache) / "refs" / revision).read_text().strip() or None
    except (OSError, ValueError):
        return None


def write_ref(repo_id: str, revision: str, commit: str, cache: Path | None = None) -> None:
    """Point refs/<revision> at `commit`, atomically (a reader never sees a half-written ref)."""
    if revision == commit:
        return
    ref = repo_folder(repo_id, cache) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    temp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    temp.write_text(commit)
    os.replace(temp, ref)


def snapshot_folder(repo_id: str, commit: str, cache: Path | None = None) -> Path:
    return repo_folder(repo_id, cache) / "snapshots" / commit


@dataclass(frozen=True)
class HubModel:
    """A hub model in the cache, ready to serve: a transformers folder, or a GGUF model's file(s)."""

    name: HubName
    snapshot: Path
    gguf: GgufModel | None = None

    @property
    def gguf_parts(self) -> list[Path]:
        return [self.snapshot / part for part in self.gguf.parts] if self.gguf else []


def find_cached(name: HubName, cache: Path | None = None) -> HubModel | None:
    """The cached, complete model `name` means, found without the network; None when there is none."""
    commit = cached_commit(name.repo_id, name.ref, cache)
    if commit is None:
        return None
    snapshot = snapshot_folder(name.repo_id, commit, cache)
    if not snapshot.is_dir():
        return None
    if name.quant is None and missing_safetensors(snapshot) == []:
        return HubModel(name, snapshot)
    chosen = [m for m in matching_gguf(gguf_models(files_in(snapshot)), name.quant) if m.complete]
    return HubModel(name, snapshot, chosen[0]) if chosen else None


def missing_safetensors(snapshot: Path) -> list[str] | None:
    """The files a safetensors model in `snapshot` still lacks ([] when complete); None when it holds none."""
    if not (snapshot / INDEX_FILE).is_file() and not (snapshot / SINGLE_WEIGHTS_FILE).is_file():
        return None
    missing = [] if (snapshot / CONFIG_FILE).is_file() else [CONFIG_FILE]
    if (snapshot / INDEX_FILE).is_file():
        missing += [shard for shard in index_shards(snapshot / INDEX_FILE) if not (snapshot / shard).is_file()]
    return missing


def index_shards(index_file: Path) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ["(an unreadable model.safetensors.index.json)"]


def files_in(snapshot: Path) -> list[str]:
    """The complete files of a snapshot (dangling links of removed blobs left out), as repository paths."""
    return sorted(str(path.relative_to(snapshot).as_posix()) for path in snapshot.rglob("*") if path.is_file())


# `nitro-torch models` -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedRepo:
    name: str  # ORG/NAME, with @revision when no ref or another ref than main points at the snapshot
    commit: str
    size_bytes: int  # the repository's blobs, shared by its snapshots
    servable: list[str]  # what --model can name: "ORG/NAME" or "ORG/NAME:QUANT"
    note: str  # "safetensors", "gguf", or why it cannot be served


def list_cached(cache: Path | None = None) -> list[CachedRepo]:
    cache = cache or hf_hub_cache_dir()
    repos: list[CachedRepo] = []
    for folder in sorted(cache.glob(_REPO_FOLDER_PREFIX + "*")):
        repo_id = folder.name[len(_REPO_FOLDER_PREFIX):].replace("--", "/")
        refs = _refs_by_commit(folder)
        size = _blobs_size(folder / "blobs")
        for snapshot in sorted(p for p in (folder / "snapshots").glob("*") if p.is_dir()):
            names = refs.get(snapshot.name, [])
            shown = repo_id if "main" in names else f"{repo_id}@{names[0] if names else snapshot.name[:12]}"
            servable, note = _servable(shown, snapshot)
            repos.append(CachedRepo(shown, snapshot.name, size, servable, note))
    return repos


def _servable(shown: str, snapshot: Path) -> tuple[list[str], str]:
    files = files_in(snapshot)
    missing = missing_safetensors(snapshot)
    if missing == []:
        return [shown], "safetensors"
    complete = [model for model in gguf_models(files) if model.complete]
    if complete:
        return [f"{shown}:{model.label}" for model in complete], "gguf"
    if missing:
        return [], f"incomplete: missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
    if any(model for model in gguf_models(files)):
        return [], "incomplete GGUF parts"
    formats = weight_formats(files)
    return [], f"no safetensors weights ({', '.join(formats)})" if formats else "no weights"


def _refs_by_commit(folder: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    refs = folder / "refs"
    for ref in sorted(p for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []:
        try:
            found.setdefault(ref.read_text().strip(), []).append(ref.relative_to(refs).as_posix())
        except OSError:
            continue
    for names in found.values():
        names.sort(key=lambda name: name != "main")
    return found


def _blobs_size(blobs: Path) -> int:
    total = 0
    for blob in blobs.glob("*") if blobs.is_dir() else []:
        try:
            if blob.is_file() and not blob.name.endswith(".incomplete"):
                total += blob.stat().st_size
        except OSError:
            continue
    return total
