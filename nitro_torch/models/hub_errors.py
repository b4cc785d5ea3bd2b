"""Why a model could not be found or fetched, each as one line that says what to do: huggingface_hub's errors
translated (`hub_error`), and the free-space check made before a download starts.

Every error is a ModelNotFoundError (a FileNotFoundError): `nitro-torch serve` exits with code 2 and the line, and
an error that crosses from the engine core process keeps its message. `status` and `code` are what Nitro's
loadmodel answers: 4xx for a name the client got wrong, 5xx for what the server lacks (network, disk), as an
out-of-memory load is a 500.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nitro_torch.models.hub_names import HubName

_TRANSPORT_ERRORS = frozenset({"TransportError", "NetworkError", "TimeoutException", "ConnectError",
                               "ProxyError", "RemoteProtocolError"})
"""httpx's (hub 1.x) and httpx2's (hub 2.x) transport failures, matched by name so that either is recognised."""


class ModelNotFoundError(FileNotFoundError):
    status = 404
    code = "model_not_found"


class HubError(ModelNotFoundError):
    """A hub model that could not be served; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    def __str__(self) -> str:
        return str(self.args[0])


class HubOfflineError(HubError):
    """Not in the cache, and HF_HUB_OFFLINE forbids the network."""


class RepoNotFoundError(HubError):
    pass


class RevisionNotFoundError(HubError):
    pass


class GatedRepoError(HubError):
    status = 403
    code = "model_gated"


class QuantNotFoundError(HubError):
    code = "quant_not_found"


class QuantRequiredError(HubError):
    status = 400
    code = "quant_required"


class NoServableWeightsError(HubError):
    status = 400
    code = "unsupported_model"


class NotEnoughDiskError(HubError):
    status = 507
    code = "insufficient_storage"


class HubUnreachableError(HubError):
    status = 502
    code = "hub_unreachable"


class DownloadError(HubError):
    status = 502
    code = "download_failed"


def hub_error(error: BaseException, name: HubName, endpoint: str, token: str | None) -> HubError:
    """huggingface_hub's (multi-line) error as the one-line HubError that says what to do."""
    from huggingface_hub import errors as hf_errors

    repo = name.repo_id
    if isinstance(error, HubError):
        return error
    if isinstance(error, hf_errors.GatedRepoError):
        return gated_error(name, endpoint, token)
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        return RepoNotFoundError(f"no model repository {repo} on {endpoint} (check the name; a private one needs "
                                 "HF_TOKEN or --hf-token-file)")
    if isinstance(error, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(f"{repo} has no revision {name.revision!r} on {endpoint}")
    if isinstance(error, hf_errors.OfflineModeIsEnabled):
        return HubOfflineError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE forbids "
                               "downloading it (offline)")
    if _caused_by(error, lambda e: isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return NotEnoughDiskError(f"the disk filled up while downloading {name}: free some space (or point "
                                  "HF_HOME / HF_HUB_CACHE elsewhere) and start again; the files already there "
                                  "are kept")
    if _caused_by(error, _is_transport_error):
        cause = _caused_by(error, _is_transport_error)
        return HubUnreachableError(f"cannot reach the Hugging Face Hub at {endpoint} to download {name} "
                                   f"({first_line(cause or error)}): check the network (or HF_ENDPOINT); "
                                   "HF_HUB_OFFLINE=1 serves from the cache only")
    if isinstance(error, hf_errors.LocalEntryNotFoundError) and error.__cause__ is not None:
        error = error.__cause__  # hf_hub_download's "cannot find it in the cache either": the hub's answer is why
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return RepoNotFoundError(f"the hub at {endpoint} refused access to {repo} ({status}): check HF_TOKEN "
                                 "(or --hf-token-file)")
    return DownloadError(f"downloading {name} from {endpoint} failed: {first_line(error)}")


def gated_error(name: HubName, endpoint: str, token: str | None) -> GatedRepoError:
    from huggingface_hub import get_token

    repo = name.repo_id
    if token or get_token():
        return GatedRepoError(f"{repo} is gated and the Hugging Face token given has no access to it: accept its "
                              f"licence at {endpoint}/{repo} with that token's account")
    return GatedRepoError(f"{repo} is gated: accept its licence at {endpoint}/{repo} and set HF_TOKEN (or "
                          "--hf-token-file)")


def _is_transport_error(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return any(kind.__name__ in _TRANSPORT_ERRORS for kind in type(error).__mro__)


def _caused_by(error: BaseException, test: Callable[[BaseException], bool]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if test(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_free_space(name: HubName, needs: list[tuple[Path, int]]) -> None:
    """Before the first byte: each filesystem must hold what is to be written there (paths on one device add)."""
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, size in needs:
        existing = _existing_ancestor(folder)
        device = os.stat(existing).st_dev
        _, before = by_device.get(device, (folder, 0))
        by_device[device] = (folder, before + size)
    for folder, size in by_device.values():
        free = shutil.disk_usage(_existing_ancestor(folder)).free
        if size > free:
            raise NotEnoughDiskError(f"not enough disk space for {name}: its files take {size_text(size)} and "
                                     f"{folder} has {size_text(free)} free (free some, or point HF_HOME / "
                                     "HF_HUB_CACHE elsewhere)")


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def size_text(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"


def first_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
