"""A small blocking OpenAI-API client on the standard library (http.client), for `nitro-torch bench --url`.

One connection per request, so that requests run in parallel from a thread pool. `stream_request` sends one
streaming request and times it: time to the first streamed text (TTFT), the gaps between successive text chunks
(inter-token latency), the end-to-end time, and the token counts the final usage chunk reports.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class ServerError(Exception):
    """The server cannot be reached or answered with an error (the message is one line)."""


@dataclass
class StreamResult:
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    """Between successive chunks that carried text."""
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    """From the usage chunk (None when the server sent none)."""
    text_chunks: int = 0


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        """A base path the server lives under (e.g. behind a proxy); '/v1' is added per route."""
        self.api_key = api_key
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _headers(self, body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if body:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def get_json(self, path: str) -> Any:
        conn = self._connection()
        try:
            conn.request("GET", self.prefix + path, headers=self._headers(False))
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise ServerError(f"GET {path}: HTTP {response.status}: {_error_message(data)}")
            return json.loads(data)
        finally:
            conn.close()

    def stream_request(self, path: str, payload: dict[str, Any]) -> StreamResult:
        """POST a streaming request and time it; never raises (failures are in `error`)."""
        result = StreamResult()
        body = json.dumps(payload).encode()
        conn = self._connection()
        t0 = time.perf_counter()
        last: float | None = None
        try:
            conn.request("POST", self.prefix + path, body=body, headers=self._headers(True))
            response = conn.getresponse()
            if response.status != 200:
                result.error = f"HTTP {response.status}: {_error_message(response.read())}"
                return result
            while True:
                line = response.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.ok = result.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = _error_message(json.dumps(event).encode())
                    break
                if _has_text(event):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - t0
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                    result.text_chunks += 1
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.completion_tokens = int(usage.get("completion_tokens") or 0)
            if not result.ok and result.error is None:
                result.error = "the stream ended without [DONE]"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            result.e2e_s = time.perf_counter() - t0
            conn.close()
        return result


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            return True
    return False


def _error_message(data: bytes) -> str:
    try:
        doc = json.loads(data)
        message = doc.get("error", doc)
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except ValueError:
        text = data.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:300] or "(empty body)"


def probe(url: str, api_key: str | None, timeout: float = 10.0) -> list[str]:
    """The ids of the models the server lists at /v1/models; ServerError (one line) when it cannot be reached."""
    client = Client(url, api_key, timeout=timeout)
    try:
        doc = client.get_json("/v1/models")
    except ServerError as exc:
        raise ServerError(f"the server at {url} answered {exc}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ServerError(f"cannot reach the server at {url}: {reason}") from None
    ids = [str(card.get("id")) for card in (doc.get("data") or []) if isinstance(card, dict) and card.get("id")]
    return ids
