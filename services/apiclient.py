"""A small REST client for the CLI: the job routes of the API, with clear errors."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

import httpx

from services.defaults import JOBS_PAGE_DEFAULT


class ApiError(RuntimeError):
    """The API refused a request (`status` its HTTP status) or could not be reached (status 0)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status


def _detail(r: httpx.Response) -> str:
    """An error body's `detail`, then the problems it lists (a 422's `distill.loss: ...`)."""
    try:
        body = r.json()
    except ValueError:
        return r.text
    if not isinstance(body, dict):
        return r.text
    detail = body.get("detail", r.text)
    parts = [detail if isinstance(detail, str) else json.dumps(detail)]
    for e in body.get("errors") or ():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc or '(body)'}: {e.get('msg', '')}")
    return "; ".join(parts)


class ApiClient:
    def __init__(self, url: str, key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        return r.json()

    def _unreachable(self, exc: httpx.TransportError) -> ApiError:
        if isinstance(exc, httpx.ConnectError):
            return ApiError(0, f"no API at {self.http.base_url} (is the stack up? `distillery up`)")
        return ApiError(0, f"API at {self.http.base_url}: {type(exc).__name__}: {exc}")

    def _request(self, method: str, path: str, **kw) -> Any:
        try:
            return self._check(self.http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers)

    def jobs(self, state: str | None = None, limit: int = JOBS_PAGE_DEFAULT) -> dict[str, Any]:
        params = {"limit": limit, **({"state": state} if state else {})}
        return self._request("GET", "/v1/jobs", params=params)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/resume")

    def events(self, job_id: str, after: str | None = None, *, follow: bool = True, reconnect_s: float = 300.0,
               on_retry: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
        """Server-Sent Events of a job: backlog then live, until the job ends (`follow=False`:
        the backlog, then a `backlog_end` event with the state of a job that has not ended).

        A stream cut by the API going away (restart, network) is resumed from the last event id
        (`Last-Event-ID`), so no event is shown twice or lost; reconnection backs off from 0.5 s
        to 5 s, tells `on_retry` why, and gives up (ApiError) after `reconnect_s` without one."""
        last, backoff, down_since, connected = after, 0.5, None, False
        while True:
            try:
                headers = {"Last-Event-ID": last} if last else {}
                params = {} if follow else {"follow": "false"}
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params,
                                      timeout=None) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._check(r)
                    connected = True
                    data: list[str] = []
                    event_id = None
                    for line in r.iter_lines():
                        if line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif not line and data:
                            if event_id:
                                last = event_id
                            backoff, down_since = 0.5, None
                            yield json.loads("\n".join(data))
                            data, event_id = [], None
                return  # the server ended the stream: the job ended (without follow: its backlog did)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if not connected:  # never reached: a wrong URL or a stack that is not up
                    raise self._unreachable(exc) from None
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > reconnect_s:
                    raise ApiError(0, f"no API at {self.http.base_url} for {reconnect_s:.0f} s "
                                      f"({type(exc).__name__})") from None
                if on_retry is not None:
                    on_retry(f"API at {self.http.base_url} unreachable ({type(exc).__name__}); "
                             f"reconnecting in {backoff:.1f} s, from event {last or 'the start'}")
                time.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    def close(self) -> None:
        self.http.close()
