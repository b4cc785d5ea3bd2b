"""Timed streaming requests for `nitro-torch bench --url`, over the shared standard-library client (sse_client).

`stream_request` sends one streaming request and times it: time to the first streamed text (TTFT), the gaps
between successive text chunks (inter-token latency), the end-to-end time, and the token counts the final usage
chunk reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nitro_torch.sse_client import Server, ServerError

__all__ = ["Server", "ServerError", "StreamResult", "probe", "stream_request"]


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


def stream_request(server: Server, path: str, payload: dict[str, Any]) -> StreamResult:
    """POST a streaming request to `path` (under /v1) and time it; never raises (failures are in `error`)."""
    result = StreamResult()
    t0 = time.perf_counter()
    last: float | None = None
    try:
        for event in server.stream(path, payload):
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
        result.ok = True
    except ServerError as exc:
        result.error = f"HTTP {exc.status}: {exc}" if exc.status else str(exc)
    finally:
        result.e2e_s = time.perf_counter() - t0
    return result


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            return True
    return False


def probe(url: str, api_key: str | None, read_timeout_s: float = 10.0) -> list[str]:
    """The ids of the models the server lists at /v1/models; ServerError (one line) when it cannot be reached."""
    try:
        doc = Server(url, api_key, read_timeout_s).get_json("/models")
    except ValueError as exc:  # not an http(s) URL
        raise ServerError(str(exc)) from None
    except ServerError as exc:
        if exc.status:
            raise ServerError(f"the server at {url} answered {exc.status}: {exc}") from None
        raise
    return [str(card.get("id")) for card in (doc.get("data") or []) if isinstance(card, dict) and card.get("id")]
