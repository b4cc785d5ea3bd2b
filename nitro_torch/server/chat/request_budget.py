"""What one request may ask of the engine, and whose share it counts against.

* `client_of`: who sent a request, for the scheduler's fair shares — the address it came from, and the API key's
  fingerprint when the server checks keys (a LAN usually shares one key, so the key alone would make every user one
  client; without key checks any made-up key would make one client many). Behind a proxy uvicorn puts the
  forwarded address in place (its `forwarded_allow_ips`).
* `check_request_budget`: prompt x n + n x max_tokens (max_tokens unset: whatever the context window leaves) must
  stay within `--max-request-tokens` (default: four context windows), and `min_tokens` within what can be
  generated — else 400 with the limit in the message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from starlette.requests import Request

from nitro_torch.server.http.errors import APIError

CONTEXT_WINDOWS_PER_REQUEST = 4
"""The default --max-request-tokens, in context windows: n=4 choices may each fill the window."""


def client_of(request: Request) -> str:
    address = request.client.host if request.client is not None else "unknown"
    config = getattr(request.app.state, "config", None)
    keys_checked = config is not None and (config.security.api_key or config.security.admin_api_key)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if keys_checked and scheme.lower() == "bearer" and key.strip():
        return f"{hashlib.sha256(key.strip().encode()).hexdigest()[:12]}@{address}"
    return address


def max_request_tokens(configured: int | None, max_model_len: int) -> int | None:
    """The limit in force: the flag's, or four context windows; None for no limit (0)."""
    if configured is None:
        return CONTEXT_WINDOWS_PER_REQUEST * max_model_len
    return configured or None


def check_request_budget(prompt_lengths: Sequence[int], n: int, max_tokens: int | None, min_tokens: int,
                         max_model_len: int, limit: int | None) -> None:
    for length in prompt_lengths:
        room = max_model_len - length if max_tokens is None else min(max_model_len - length, max_tokens)
        if min_tokens > room:
            raise APIError(400, f"min_tokens is {min_tokens}, but at most {room} tokens can be generated for this "
                                f"prompt of {length} tokens (context window {max_model_len}"
                                + (f", max_tokens {max_tokens})." if max_tokens is not None else ")."),
                           param="min_tokens", code="invalid_value")
    if limit is None:
        return
    total = sum(n * (length + (max_model_len - length if max_tokens is None else max_tokens))
                for length in prompt_lengths)
    if total > limit:
        asked = "max_tokens" if max_tokens is not None else "max_tokens unset, so up to the context window"
        raise APIError(400, f"This request asks for up to {total} tokens (prompt x n + n x max_tokens; "
                            f"n={n}, {asked}), more than this server's limit of {limit} tokens per request. "
                            "Lower n or max_tokens.",
                       param="max_tokens" if max_tokens is not None else "n", code="request_too_large")


def check_budget_of(request: Request, prompt_lengths: Sequence[int], n: int, max_tokens: int | None,
                    min_tokens: int, max_model_len: int) -> None:
    """`check_request_budget` under this server's --max-request-tokens."""
    config = getattr(request.app.state, "config", None)
    configured = config.server.max_request_tokens if config is not None else None
    check_request_budget(prompt_lengths, n, max_tokens, min_tokens, max_model_len,
                         max_request_tokens(configured, max_model_len))
