"""Stored responses, for `previous_response_id` and GET/DELETE /v1/responses/{id}: in memory, one store per app,
at most --responses-store of them; the oldest is dropped first."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from nitro_torch.server.openai.responses_protocol import ResponseObject


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    conversation: tuple[dict[str, Any], ...]
    """Chat messages: every input (without instructions, which a continuation does not inherit) and the output.
    A continuation's conversation shares the message dicts of the one it continues, so they are never changed."""


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._stored: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stored)

    def put(self, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._stored[stored.response.id] = stored
        while len(self._stored) > self.capacity:
            self._stored.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._stored.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._stored.pop(response_id, None) is not None


def store_of(request: Request) -> ResponseStore:
    """The app's store, made on first use with the app's --responses-store."""
    state = request.app.state
    store = getattr(state, "responses_store", None)
    if store is None:
        store = state.responses_store = ResponseStore(state.config.server.responses_store)
    return store
