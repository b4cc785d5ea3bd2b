import json

from nitro_torch.server.http.sse import DONE_EVENT, sse_event


def test_event_framing():
    event = sse_event({"text": "héllo\nworld"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert b"\n" not in event[:-2]  # one line per event: newlines inside JSON strings stay escaped
    assert json.loads(event[len(b"data: "):]) == {"text": "héllo\nworld"}
    assert DONE_EVENT == b"data: [DONE]\n\n"
