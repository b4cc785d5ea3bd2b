"""Serving a model by its hub name: find it in the standard Hugging Face cache, or download what serving needs.

The cache comes first and needs no network: a model downloaded once starts later without touching it (a branch
name is read from the cache's refs). Only a name missing from the cache is looked up on the hub (HF_ENDPOINT,
HF_TOKEN or --hf-token-file; never under HF_HUB_OFFLINE=1): its file list picks the files (hub_names), the free
disk space is checked before the first byte, and the files download under one progress bar, config.json last, so
that an interrupted download is never taken for a finished one. huggingface_hub does the transfers: it resumes a
dropped connection with a Range request, and a rerun downloads only the files still missing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nitro_torch.config import ConfigError
from nitro_torch.models.embedded import nitro_cache_dir, report_progress
from nitro_torch.models.gguf_merge import single_gguf
from nitro_torch.models.hub_cache import (
    HubModel,
    find_cached,
    hf_hub_cache_dir,
    index_shards,
    snapshot_folder,
    write_ref,
)
from nitro_torch.models.hub_errors import (
    HubError,
    HubOfflineError,
    HubUnreachableError,
    NoServableWeightsError,
    QuantNotFoundError,
    QuantRequiredError,
    check_free_space,
    gated_error,
    hub_error,
    size_text,
)
from nitro_torch.models.hub_names import (
    CONFIG_FILE,
    INDEX_FILE,
    GgufModel,
    HubName,
    gguf_models,
    hub_name_of,
    matching_gguf,
    quants_of,
    safetensors_files,
    weight_formats,
)

logger = logging.getLogger("nitro_torch.models")

DEFAULT_ENDPOINT = "https://huggingface.co"
DOWNLOAD_WORKERS = 4
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read at call time as huggingface_hub reads it at import."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def read_token_file(path: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read hf_token_file {path}: {error.strerror}") from None
    if not token:
        raise ConfigError(f"hf_token_file {path} is empty")
    return token


def fetch_model(model: str, *, hf_token_file: str | None = None, cache_dir: str | None = None,
                progress: bool = True) -> Path | None:
    """What to load for a --model that is a hub name: its snapshot folder, or its one .gguf file (split parts
    joined); downloaded first when the cache lacks it. None when `model` is not a hub name."""
    name = hub_name_of(model)
    if name is None:
        return None
    hub_model = fetch_hub_model(name, hf_token_file=hf_token_file, progress=progress,
                                merge_cache=nitro_cache_dir(cache_dir))
    if hub_model.gguf is None:
        return hub_model.snapshot
    return single_gguf(hub_model.gguf_parts, cache_dir)


def cached_gguf_file(model: str, cache_dir: str | None = None) -> Path | None:
    """The .gguf file a cached hub GGUF model is served from (no network, no download); None otherwise."""
    name = hub_name_of(model)
    hub_model = find_cached(name) if name is not None else None
    if hub_model is None or hub_model.gguf is None:
        return None
    parts = hub_model.gguf_parts
    if len(parts) == 1:
        return parts[0]
    from nitro_torch.models.gguf_merge import merged_gguf_path

    merged = merged_gguf_path(parts, cache_dir)
    return merged if merged.is_file() else None


def fetch_hub_model(name: HubName, *, hf_token_file: str | None = None, progress: bool = True,
                    refresh: bool = False, merge_cache: Path | None = None) -> HubModel:
    """The cached model `name` means, downloading it when missing (or, with `refresh`, when the hub has a newer
    commit: `nitro-torch pull`, which keeps the cached copy when the hub cannot be reached)."""
    cache = hf_hub_cache_dir()
    cached = find_cached(name, cache)
    if cached is not None and not refresh:
        return cached
    if hub_offline():
        if cached is not None:
            return cached
        raise HubOfflineError(_offline_message(name, cache))
    token = read_token_file(hf_token_file) if hf_token_file else None
    try:
        return _download(name, cache, token, progress, merge_cache)
    except HubUnreachableError as error:
        if cached is None:
            raise
        report_progress(f"{error}; using the cached copy of {name}")
        return cached


def _offline_message(name: HubName, cache: Path) -> str:
    return (f"model {str(name)!r} is not in the local Hugging Face cache at {cache}, and HF_HUB_OFFLINE keeps the "
            f"hub out of reach (offline). To fix: run `nitro-torch pull {name}` (or `hf download {name.repo_id}`) "
            "where there is network and bring its cache here (or set HF_HOME / HF_HUB_CACHE to where it is), unset "
            "HF_HUB_OFFLINE, or pass a local model folder or .gguf file with --model.")


def _download(name: HubName, cache: Path, token: str | None, progress: bool, merge_cache: Path | None) -> HubModel:
    from huggingface_hub import HfApi, get_token

    endpoint = hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(name.repo_id, revision=name.revision,
                                                                 files_metadata=True)
    except Exception as error:
        raise hub_error(error, name, endpoint, token) from None
    if getattr(info, "gated", False) and not (token or get_token()):  # known without trying a download
        raise gated_error(name, endpoint, token)
    sizes = {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or []}
    files, gguf = plan_files(name, sizes)
    commit = str(info.sha)
    snapshot = snapshot_folder(name.repo_id, commit, cache)
    missing = [file for file in files if not (snapshot / file).is_file()]
    needs = [(cache, sum(sizes.get(file, 0) for file in missing))]
    if gguf is not None and len(gguf.parts) > 1 and merge_cache is not None:
        needs.append((merge_cache, sum(sizes.get(part, 0) for part in gguf.parts)))
    check_free_space(name, needs)

    fetch = _Fetcher(name, commit, cache, token, endpoint)
    body, last = [f for f in missing if f != CONFIG_FILE], [f for f in missing if f == CONFIG_FILE]
    with _ProgressBar(name, {file: sizes.get(file, 0) for file in missing}, progress) as bar:
        fetch.all(body, bar)
        extra = _unlisted_shards(snapshot, sizes) if gguf is None else []
        if extra:  # an index naming shards other than model-*.safetensors
            check_free_space(name, [(cache, sum(sizes.get(file, 0) for file in extra))])
            bar.grow({file: sizes.get(file, 0) for file in extra})
            fetch.all(extra, bar)
        fetch.all(last, bar)
    write_ref(name.repo_id, name.ref, commit, cache)
    return HubModel(name, snapshot, gguf)


def plan_files(name: HubName, sizes: dict[str, int]) -> tuple[list[str], GgufModel | None]:
    """The files to download for `name` from a repository holding `sizes`: a safetensors model (no :QUANT), or
    the parts of one GGUF model."""
    if name.quant is None:
        files = safetensors_files(sizes)
        if files is not None:
            return files, None
    models = gguf_models(sizes)
    chosen = sorted(matching_gguf(models, name.quant), key=lambda model: not model.complete)
    if chosen and not chosen[0].complete:
        raise NoServableWeightsError(f"{name.repo_id} holds {len(chosen[0].parts)} of the "
                                     f"{chosen[0].expected_parts} parts of {chosen[0].stem}.gguf")
    if chosen:
        return list(chosen[0].parts), chosen[0]
    quants = ", ".join(quants_of(models))
    if name.quant is None and models:
        raise QuantRequiredError(f"{name.repo_id} holds several GGUF quants and none is the default Q4_K_M: name "
                                 f"one as {name.repo_id}:QUANT (quants there: {quants})")
    if name.quant is not None and models:
        raise QuantNotFoundError(f"no {name.quant} file in {name.repo_id}; quants there: {quants}")
    formats = ", ".join(weight_formats(sizes)) or "no weight files"
    wanted = f"a GGUF file for {name.quant}" if name.quant else \
        "config.json with model.safetensors (or model.safetensors.index.json and its shards), or GGUF files"
    raise NoServableWeightsError(f"{name.repo_id} has no servable weights: nitro_torch needs {wanted}; the "
                                 f"repository has: {formats}")


def _unlisted_shards(snapshot: Path, sizes: dict[str, int]) -> list[str]:
    index = snapshot / INDEX_FILE
    if not index.is_file():
        return []
    return [shard for shard in index_shards(index) if shard in sizes and not (snapshot / shard).is_file()]


class _Fetcher:
    """hf_hub_download of one commit's files into the cache, a few at a time. The workers are daemon threads and
    the caller waits in short joins, so that Ctrl-C stops a download at once instead of after the current files."""

    def __init__(self, name: HubName, commit: str, cache: Path, token: str | None, endpoint: str) -> None:
        self.name, self.commit, self.cache, self.token, self.endpoint = name, commit, cache, token, endpoint

    def all(self, files: list[str], bar: _ProgressBar) -> None:
        pending = list(reversed(files))
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    if errors or not pending:
                        return
                    file = pending.pop()
                try:
                    self.one(file, bar)
                except BaseException as error:  # handed to the waiting caller, which raises it
                    with lock:
                        errors.append(error)
                    return

        workers = [threading.Thread(target=work, name=f"download-{index}", daemon=True)
                   for index in range(min(DOWNLOAD_WORKERS, len(files)))]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)
        if errors:
            raise errors[0]

    def one(self, file: str, bar: _ProgressBar) -> None:
        from huggingface_hub import hf_hub_download

        options: dict[str, Any] = {"tqdm_class": bar.file_bar_class()} if _takes_tqdm_class() else {}
        try:
            hf_hub_download(self.name.repo_id, file, revision=self.commit, cache_dir=self.cache, token=self.token,
                            endpoint=self.endpoint, **options)
        except Exception as error:
            raise hub_error(error, self.name, self.endpoint, self.token) from None
        bar.file_done(file)


@functools.cache
def _takes_tqdm_class() -> bool:
    """huggingface_hub releases without hf_hub_download(tqdm_class=) advance the bar by whole files."""
    from huggingface_hub import hf_hub_download

    return "tqdm_class" in inspect.signature(hf_hub_download).parameters


class _ProgressBar:
    """One bar (bytes) for the whole model on stderr; without `show`, a line when the download starts and ends."""

    def __init__(self, name: HubName, sizes: dict[str, int], show: bool) -> None:
        self.name, self.sizes, self.show = name, dict(sizes), show
        self._lock = threading.Lock()
        self._bar: Any = None
        self._started = time.monotonic()

    def __enter__(self) -> _ProgressBar:
        if not self.sizes:
            return self
        total = sum(self.sizes.values())
        report_progress(f"downloading {self.name} ({len(self.sizes)} files, {size_text(total)}) from "
                        f"{hub_endpoint()} into {hf_hub_cache_dir()} ...")
        if self.show:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"downloading {self.name.repo_id}", unit="B", unit_scale=True,
                             unit_divisor=1000, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.sizes and error is None:
            report_progress(f"downloaded {self.name} in {time.monotonic() - self._started:.1f} s")

    def grow(self, sizes: dict[str, int]) -> None:
        self.sizes.update(sizes)
        if self._bar is not None:
            self._bar.total = sum(self.sizes.values())
            self._bar.refresh()

    def add(self, size: int) -> None:
        if self._bar is not None and size:
            with self._lock:
                self._bar.update(size)

    def file_done(self, file: str) -> None:
        if not _takes_tqdm_class():
            self.add(self.sizes.get(file, 0))

    def file_bar_class(self) -> type:
        """A tqdm stand-in for huggingface_hub's per-file bar (as snapshot_download's own aggregating one): it adds
        the file's bytes to this one bar. Having `update_transfer` makes an Xet download report through it too."""
        add: Callable[[int], None] = self.add

        class FileBar:
            def __init__(self, *args: object, total: int | None = None, initial: int = 0, **kwargs: object) -> None:
                self.total, self.n = total, int(initial or 0)
                self.format_dict: dict[str, object] = {}
                add(self.n)

            def update(self, n: float | None = 1) -> None:
                self.n += int(n or 0)
                add(int(n or 0))

            def update_transfer(self, n: float | None = 1) -> None:  # network bytes: the bar counts file bytes
                pass

            def __enter__(self) -> FileBar:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def __getattr__(self, attribute: str) -> Callable[..., None]:  # close, refresh, set_postfix_str, ...
                return lambda *args, **kwargs: None

        return FileBar


__all__ = ["HubError", "cached_gguf_file", "fetch_hub_model", "fetch_model", "hub_endpoint", "hub_offline",
           "plan_files", "read_token_file"]
