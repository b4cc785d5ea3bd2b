"""A Hugging Face Hub on loopback, for tests that point HF_ENDPOINT at it: the parts of the hub's HTTP API that
huggingface_hub's model_info and hf_hub_download use, answered as huggingface.co answers them.

- GET  /api/models/{repo}[/revision/{rev}]      repository info with `siblings` (sizes, blob ids, LFS sha256)
- HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag / X-Linked-Etag, Content-Length
- GET  /{repo}/resolve/{rev}/{path}             the bytes; `Range: bytes=N-` answered 206
- errors with X-Error-Code: RepoNotFound (404), RevisionNotFound (404), EntryNotFound (404), GatedRepo (401
  without a token, 403 with another one).

Every request is recorded; a file's GETs can be cut after some bytes (the connection dropped mid-body), fail with
a 500, or be slowed down.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".onnx", ".pth")
CHUNK = 64 * 1024


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    claimed_sizes: dict[str, int] = field(default_factory=dict)
    """Sizes the API reports instead of the real ones (a model larger than the disk)."""

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        return digest.hexdigest()

    def sibling(self, name: str) -> dict[str, object]:
        data = self.files[name]
        size = self.claimed_sizes.get(name, len(data))
        entry: dict[str, object] = {"rfilename": name, "size": size, "blobId": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
        return entry


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None


class LoopbackHub:
    def __init__(self, token: str = "hf_loopback_token") -> None:
        self.token = token
        self.repos: dict[str, HubRepo] = {}
        self.seen: list[Seen] = []
        self.cut_after: dict[str, list[int]] = {}
        """file path -> byte counts: each GET of it sends that many bytes of the body, then drops the connection."""
        self.fail_gets: dict[str, int] = {}
        """file path -> how many of its next GETs answer 500."""
        self.seconds_per_chunk = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def add(self, repo: HubRepo) -> HubRepo:
        self.repos[repo.repo_id] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def downloads(self, path_suffix: str = "") -> list[Seen]:
        """The GETs of files (not HEADs, not API calls), optionally of one file."""
        return [s for s in self.seen if s.method == "GET" and "/resolve/" in s.path and s.path.endswith(path_suffix)]

    def forget(self) -> None:
        with self._lock:
            self.seen.clear()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LoopbackHub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.record(Seen(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        if path.startswith("/api/models/"):
            self._repo_info(path.removeprefix("/api/models/"))
        elif "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, file = rest.partition("/")
            self._file(repo_id, revision, file, body)
        else:
            self._error(404, "RepoNotFound", "Not found")

    def _repo_info(self, rest: str) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if revision not in ("", "main", repo.commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        info = {"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                "private": False, "disabled": False, "gated": "manual" if repo.gated else False, "downloads": 0,
                "likes": 0, "tags": [], "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z", "siblings": [repo.sibling(n) for n in sorted(repo.files)]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

    def _file(self, repo_id: str, revision: str, file: str, body: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", body)
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id", body)
        commit = {"X-Repo-Commit": repo.commit}
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            status = 403 if self.headers.get("Authorization") else 401
            return self._error(status, "GatedRepo", "Access to model is restricted", body, commit)
        if file not in repo.files:
            return self._error(404, "EntryNotFound", "Entry not found", body, commit)
        if body and self.hub.fail_gets.get(file, 0) > 0:
            self.hub.fail_gets[file] -= 1
            return self._error(500, None, "Internal Error", body, commit)
        data = repo.files[file]
        sibling = repo.sibling(file)
        headers = {**commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{sibling["blobId"]}"'}
        if "lfs" in sibling:
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        start = _range_start(self.headers.get("Range")) if body else 0
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        cuts = self.hub.cut_after.get(file)
        cut = cuts.pop(0) if body and cuts else None
        self._send(status, data[start:], headers, body, cut=cut)

    def _error(self, status: int, code: str | None, message: str, body: bool = True,
               headers: dict[str, str] | None = None) -> None:
        extra = {**(headers or {}), "X-Error-Message": message, "Content-Type": "application/json"}
        if code:
            extra["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), extra, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool, cut: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        sent = 0
        limit = len(data) if cut is None else min(cut, len(data))
        while sent < limit:
            chunk = data[sent:min(sent + CHUNK, limit)]
            self.wfile.write(chunk)
            sent += len(chunk)
            if self.hub.seconds_per_chunk:
                time.sleep(self.hub.seconds_per_chunk)
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    first = header.removeprefix("bytes=").split("-", 1)[0]
    return int(first) if first.isdigit() else 0
