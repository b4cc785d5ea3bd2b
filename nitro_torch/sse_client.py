"""A small standard-library client for the server's JSON and server-sent-event routes (no httpx/openai needed):
the terminal chat's, and `nitro-torch bench --url`'s (one connection per request, so threads run requests in
parallel)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Generator
from typing import Any
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # a long prompt on a busy CPU server may take minutes before the first token


class ServerError(Exception):
    """The server answered with an error (`{"error": {"message": ...}}`), or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Server:
    """One server: `url` may be given with or without `/v1`, a trailing slash or a scheme."""

    def __init__(self, url: str, api_key: str | None = None, read_timeout_s: float = READ_TIMEOUT_S) -> None:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        path = parts.path.rstrip("/")
        self.root = path[: -len("/v1")] if path.endswith("/v1") else path
        """The server's root path (where /health is); the API is under `prefix`, root + /v1."""
        self.prefix = self.root + "/v1"
        self.scheme, self.netloc = parts.scheme, parts.netloc
        self.base_url = f"{parts.scheme}://{parts.netloc}{self.root}"
        self.api_key = api_key
        self.read_timeout_s = read_timeout_s

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.netloc, timeout=CONNECT_TIMEOUT_S)

    def _send(self, method: str, path: str, body: dict[str, Any] | None, under_v1: bool = True
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        headers = {"Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.connect()
            conn.sock.settimeout(self.read_timeout_s)
            conn.request(method, (self.prefix if under_v1 else self.root) + path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ServerError(f"cannot reach the server at {self.base_url}: {_reason(exc)}") from None
        except BaseException:  # Ctrl-C while connecting: never leave the socket open
            conn.close()
            raise
        if response.status >= 400:
            try:
                raise ServerError(_error_message(response.read()), response.status)
            finally:
                conn.close()
        return conn, response

    def get_json(self, path: str, under_v1: bool = True) -> Any:
        """GET `path` under /v1 (or, with `under_v1` False, under the server's root: /health)."""
        conn, response = self._send("GET", path, None, under_v1)
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            where = f"{self.base_url}{'/v1' if under_v1 else ''}{path}"
            raise ServerError(f"bad answer from {where}: {_reason(exc)}") from None
        finally:
            conn.close()

    def stream(self, path: str, body: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """POSTs `body` and yields each `data:` event's JSON until `[DONE]` (a stream cut short of it is a ServerError).
        Closing the generator (or an exception in it, Ctrl-C included) closes the connection at once, which is how
        the server learns to abort."""
        conn, response = self._send("POST", path, body)
        try:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments and other SSE fields
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ServerError(_error_message(data.encode("utf-8")))
                yield event
            raise ServerError(f"the stream from {self.base_url} ended without [DONE]")
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"connection to {self.base_url} lost: {_reason(exc)}") from None
        except ValueError as exc:
            raise ServerError(f"bad event from {self.base_url}: {exc}") from None
        finally:
            _hang_up(conn, response)


def _hang_up(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    # The response keeps its own reference to the socket, so close() alone would not send the FIN; shutdown does.
    if conn.sock is not None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    response.close()
    conn.close()


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:500] or "empty error response"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
