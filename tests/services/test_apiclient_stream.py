"""`submit --follow` / `logs -f` survive an API restart: the stream resumes from Last-Event-ID."""

from __future__ import annotations

import json

import httpx
import pytest

from services.apiclient import ApiClient, ApiError


def sse(entry_id: str, event: dict) -> bytes:
    return f"id: {entry_id}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()


class CutStream(httpx.SyncByteStream):
    """Sends some bytes, then the connection drops as when the API process is killed."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_a_cut_stream_resumes_after_the_last_event_without_repeats_or_gaps(monkeypatch):
    monkeypatch.setattr("services.apiclient.time.sleep", lambda s: None)
    events = [{"kind": "metrics", "step": i} for i in range(1, 6)] + [{"kind": "end", "state": "succeeded"}]
    ids = [f"100-{i}" for i in range(len(events))]
    seen_headers: list[str | None] = []
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        seen_headers.append(request.headers.get("Last-Event-ID"))
        if calls["n"] == 1:  # two events, then the API dies
            return httpx.Response(200, stream=CutStream([sse(ids[0], events[0]), sse(ids[1], events[1])]))
        if calls["n"] == 2:  # the API is restarting
            raise httpx.ConnectError("connection refused")
        start = ids.index(request.headers["Last-Event-ID"]) + 1
        return httpx.Response(200, content=b"retry: 3000\n\n" + b"".join(
            sse(i, e) for i, e in zip(ids[start:], events[start:])))

    client = ApiClient("http://api.test")
    client.http = httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(handler))
    retries: list[str] = []
    got = list(client.events("job-1", on_retry=retries.append))
    assert got == events  # every event once, in order
    assert seen_headers == [None, "100-1", "100-1"]
    assert len(retries) == 2 and "reconnecting" in retries[0]


def test_no_api_at_all_fails_at_once():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    client = ApiClient("http://api.test")
    client.http = httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError, match="no API at"):
        list(client.events("job-1"))
