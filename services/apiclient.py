"""A small REST client for the CLI: the job routes of the API, with clear errors."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class ApiClient:
    def __init__(self, url: str, key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail if isinstance(detail, str) else json.dumps(detail))
        return r.json()

    def _request(self, method: str, path: str, **kw) -> Any:
        try:
            return self._check(self.http.request(method, path, **kw))
        except httpx.ConnectError:
            raise ApiError(0, f"no API at {self.http.base_url} (is the stack up? `distillery up`)") from None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers)

    def jobs(self, state: str | None = None, limit: int = 50) -> dict[str, Any]:
        params = {"limit": limit, **({"state": state} if state else {})}
        return self._request("GET", "/v1/jobs", params=params)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: str | None = None) -> Iterator[dict[str, Any]]:
        """Server-Sent Events of a job: backlog then live, until the job ends."""
        params = {"after": after} if after else {}
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params=params, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                data: list[str] = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.ConnectError:
            raise ApiError(0, f"no API at {self.http.base_url}") from None

    def close(self) -> None:
        self.http.close()
