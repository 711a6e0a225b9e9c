"""The REST API against a real Redis: the job round trip, SSE, and RELIABILITY R-23 (Redis down and
restarted), R-30 (auth), R-31 (body limit), R-32 (schema fuzz, OpenAPI), R-33 (path traversal),
R-34 (trust_remote_code)."""

from __future__ import annotations

import base64
import dataclasses
import builtins
import hmac
import json
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from openapi_spec_validator import validate as validate_openapi

import services.api as api
from services.api import InsecureConfig, create_app, serve
from services.settings import Settings
from services.store import JobStore
from student_worker.config import JobSpec
from student_worker.events import RedisSink

KEYS = ("first-key-0123456789abcdef", "second-key-fedcba9876543210")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
V1_ROUTES = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{id}"),
             ("GET", "/v1/jobs/{id}/events"), ("POST", "/v1/jobs/{id}/cancel"), ("POST", "/v1/jobs/{id}/resume")]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def roots(tmp_path: Path) -> SimpleNamespace:
    r = SimpleNamespace(models=tmp_path / "models", data=tmp_path / "data", runs=tmp_path / "runs",
                        outside=tmp_path / "outside", evil=tmp_path / "models-evil")
    for d in (r.models / "student", r.models / "teacher", r.data, r.runs, r.outside, r.evil):
        d.mkdir(parents=True)
    (r.data / "train.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    r.secret = r.outside / "secret.txt"
    r.secret.write_text("outside the roots\n")
    (r.models / "escape").symlink_to(r.outside)
    (r.models / "alias").symlink_to(r.models / "student")
    (r.data / "leak.jsonl").symlink_to(r.secret)
    return r


def make_settings(redis_url: str, prefix: str, roots: SimpleNamespace, **kw: Any) -> Settings:
    # No Ray answers at that address: jobs are accepted without the fit check unless a test says.
    base = dict(redis_url=redis_url, redis_prefix=prefix, api_keys=KEYS, model_roots=(str(roots.models),),
                data_roots=(str(roots.data),), runs_dir=str(roots.runs), max_body_bytes=256_000,
                ray_address="http://127.0.0.1:1")
    return Settings(**{**base, **kw})


@pytest.fixture
def settings(redis_url, redis_prefix, roots) -> Settings:
    return make_settings(redis_url, redis_prefix, roots)


@pytest.fixture
def store(settings) -> Iterator[JobStore]:
    s = JobStore(settings.redis_url, settings.redis_prefix, settings.events_max)
    yield s
    s.r.close()


@pytest.fixture
def client(settings, store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store, ray_ping=lambda: True), headers=AUTH) as c:
        yield c


def spec(**sections: Any) -> dict[str, Any]:
    """A valid spec with paths relative to the roots; keyword sections replace or merge."""
    doc: dict[str, Any] = {
        "name": "api-test", "student": {"model": "student"}, "teacher": {"local_model": "teacher"},
        "data": {"path": "train.jsonl"}, "distill": {"steps": 2, "batch_size": 2},
        "checkpoint": {"dir": "job"},
    }
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    return doc


@contextmanager
def live_server(app) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1:<ephemeral>, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-Sent Events from text lines; comments come as {"comment": ...}."""
    event: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif not line:
            if event:
                yield event
            event = {}
        else:
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")


def documented(doc: dict[str, Any], method: str, path: str, status: int) -> bool:
    return str(status) in doc["paths"][path][method.lower()]["responses"]


# ------------------------------------------------------------------------------------ jobs
def test_submit_get_list_cancel(client, roots, store):
    r = client.post("/v1/jobs", json=spec())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["attempt"] == 0 and job["name"] == "api-test"
    # paths are stored resolved inside their roots; checkpoint.dir inside runs_dir
    assert job["spec"]["student"]["model"] == str(roots.models / "student")
    assert job["spec"]["data"]["path"] == str(roots.data / "train.jsonl")
    assert job["spec"]["checkpoint"]["dir"] == str(roots.runs / "job")
    assert JobSpec.model_validate(job["spec"]).distill.steps == 2
    assert client.get(f"/v1/jobs/{job['id']}").json() == job

    ids = [job["id"]] + [client.post("/v1/jobs", json=spec(name=f"j{i}")).json()["id"] for i in range(4)]
    newest_first = ids[::-1]
    pages = [client.get("/v1/jobs", params={"offset": o, "limit": 2}).json() for o in (0, 2, 4)]
    assert [j["id"] for p in pages for j in p["jobs"]] == newest_first
    assert [p["next_offset"] for p in pages] == [2, 4, None]

    assert client.post(f"/v1/jobs/{ids[0]}/cancel").json() == {"id": ids[0], "state": "cancelled"}
    assert client.post(f"/v1/jobs/{ids[0]}/cancel").json()["state"] == "cancelled"  # repeat is harmless
    assert client.get(f"/v1/jobs/{ids[0]}").json()["state"] == "cancelled"
    assert [j["id"] for j in client.get("/v1/jobs?state=cancelled").json()["jobs"]] == [ids[0]]
    assert [j["id"] for j in client.get("/v1/jobs?state=queued").json()["jobs"]] == newest_first[:-1]

    store.transition(ids[1], allowed=("queued",), to="running")
    assert client.post(f"/v1/jobs/{ids[1]}/cancel").json()["state"] == "cancelling"
    store.transition(ids[2], allowed=("queued",), to="succeeded")
    r = client.post(f"/v1/jobs/{ids[2]}/cancel")
    assert r.status_code == 409 and r.json()["error"] == "conflict"


def test_resume_queues_a_failed_or_cancelled_job_again(client, store):
    ids = [client.post("/v1/jobs", json=spec(name=f"r{i}")).json()["id"] for i in range(3)]
    store.transition(ids[0], allowed=("queued",), to="failed", reason="teacher_unavailable", error="gone")
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    for job_id, was in ((ids[0], "failed"), (ids[1], "cancelled")):
        r = client.post(f"/v1/jobs/{job_id}/resume")
        assert r.status_code == 200, r.text
        job = r.json()
        assert (job["state"], job["reason"], job["error"], job["resumes"]) == ("queued", "", "", 1)
        events = [e for _, e in store.events(job_id)]
        assert (events[-1]["state"], events[-1]["previous"], events[-1]["reason"]) == ("queued", was, "resumed")
    r = client.post(f"/v1/jobs/{ids[2]}/resume")  # still queued
    assert r.status_code == 409 and "only a failed or cancelled job resumes" in r.json()["detail"]
    assert client.post("/v1/jobs/nope-123/resume").status_code == 404


def test_a_job_larger_than_the_cluster_is_refused_with_the_numbers(settings, store):
    from services.rayapi import cluster_of

    two_cpus = lambda: cluster_of([{"CPU": 2.0, "memory": 4.0 * 2**30}])  # noqa: E731
    with TestClient(create_app(settings, store, ray_ping=lambda: True, ray_cluster=two_cpus), headers=AUTH) as c:
        r = c.post("/v1/jobs", json=spec(resources={"workers": 4}))
        assert r.status_code == 422 and r.json()["error"] == "does_not_fit"
        assert r.json()["detail"].startswith("the job needs 4 CPU (4 workers x 1 CPU); the cluster has 2 CPU in all")
        r = c.post("/v1/jobs", json=spec(resources={"workers": 1, "memory_gb_per_worker": 8}))
        assert r.status_code == 422 and "needs 8 GiB memory" in r.json()["detail"]
        assert c.post("/v1/jobs", json=spec(resources={"workers": 2})).status_code == 201
    grows = dataclasses.replace(settings, cluster_autoscales=True)
    with TestClient(create_app(grows, store, ray_ping=lambda: True, ray_cluster=two_cpus), headers=AUTH) as c:
        assert c.post("/v1/jobs", json=spec(resources={"workers": 4})).status_code == 201  # waits for nodes
    assert len(store.list()) == 2


def test_idempotency_key(client):
    first = client.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "req-42"})
    again = client.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "req-42"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json=spec(seed=7), headers={"Idempotency-Key": "req-42"})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    assert client.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "no spaces"}).status_code == 422
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1


def test_not_found_and_bad_queries(client):
    for method, path in [("GET", "/v1/jobs/nope-123"), ("POST", "/v1/jobs/nope-123/cancel"),
                         ("GET", "/v1/jobs/nope-123/events")]:
        r = client.request(method, path)
        assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "no such job"}
    for query in ("limit=0", "limit=201", "offset=-1", "offset=10001", "state=bogus", "limit=abc"):
        r = client.get(f"/v1/jobs?{query}")
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", query
    assert client.get("/v1/jobs/bad:id").status_code == 422
    assert client.get("/v1/jobs/x/events", params={"after": "nope"}).status_code == 422
    # Above 2^64 Redis refuses a stream id mid-stream: refused up front instead.
    for too_big in ("18446744073709551616", "1-18446744073709551616", "99999999999999999999"):
        assert client.get("/v1/jobs/x/events", params={"after": too_big}).status_code == 422
        r = client.get("/v1/jobs/x/events", headers={"Last-Event-ID": too_big})
        assert r.status_code == 422, too_big
    assert client.get("/v1/jobs/-x").status_code == 422


# ------------------------------------------------------------------------------------ SSE
def test_events_backlog_then_live_until_terminal(settings, store):
    app = create_app(settings, store, ray_ping=lambda: True, sse_block_ms=200)
    with live_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
        job_id = http.post("/v1/jobs", json=spec()).json()["id"]
        sink = RedisSink(settings.redis_url, job_id, attempt=0, prefix=settings.redis_prefix)
        for step in (1, 2):
            sink.emit({"kind": "metrics", "stage": "distill", "step": step, "rank": 0, "loss": 1.0 / step})
        backlog_read = threading.Event()

        def worker() -> None:  # a fake scheduler + worker, writing while the client listens
            backlog_read.wait(10)
            store.transition(job_id, allowed=("queued",), to="starting")
            store.transition(job_id, allowed=("starting",), to="running")
            sink.emit({"kind": "metrics", "stage": "distill", "step": 3, "rank": 0, "loss": 0.25})
            assert sink.flush()  # the sink writes in the background; a worker flushes it before it ends
            store.transition(job_id, allowed=("running",), to="succeeded")

        thread = threading.Thread(target=worker)
        thread.start()
        got = []
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for ev in sse(r.iter_lines()):
                if "data" in ev:
                    got.append(ev)
                if len(got) == 2:
                    backlog_read.set()
        thread.join()
        sink.close()
        kinds = [(e["event"], json.loads(e["data"]).get("step") or json.loads(e["data"]).get("state")) for e in got]
        assert kinds == [("metrics", 1), ("metrics", 2), ("state", "starting"), ("state", "running"),
                         ("metrics", 3), ("state", "succeeded"), ("end", "succeeded")]
        ids = [e["id"] for e in got[:-1]]
        assert "id" not in got[-1] and len(set(ids)) == len(ids)

        # resume after the second event: by Last-Event-ID, and by ?after=
        for kwargs in ({"headers": {**AUTH, "Last-Event-ID": ids[1]}}, {"params": {"after": ids[1]}}):
            with http.stream("GET", f"/v1/jobs/{job_id}/events", **kwargs) as r:
                again = [e for e in sse(r.iter_lines()) if "data" in e]
            assert [e.get("id") for e in again] == ids[2:] + [None]


def test_events_without_follow_send_the_backlog_and_say_the_job_goes_on(settings, store, client):
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    sink = RedisSink(settings.redis_url, job_id, attempt=0, prefix=settings.redis_prefix)
    sink.emit({"kind": "metrics", "stage": "distill", "step": 1, "rank": 0, "loss": 1.0})
    sink.close()
    start = time.monotonic()
    r = client.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"})
    got = [e for e in sse(r.text.splitlines()) if "data" in e]
    assert time.monotonic() - start < 2
    # not `end`: the job has not ended, the backlog has
    assert [e["event"] for e in got] == ["metrics", "backlog_end"]
    last = json.loads(got[-1]["data"])
    assert last["kind"] == "backlog_end" and last["state"] == "queued" and "so far" in last["detail"]


def test_events_heartbeat_and_cancel_ends_stream(settings, store):
    app = create_app(settings, store, ray_ping=lambda: True, sse_block_ms=100, sse_heartbeat_s=0.2)
    with live_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
        job_id = http.post("/v1/jobs", json=spec()).json()["id"]
        timer = threading.Timer(1.0, lambda: http.post(f"/v1/jobs/{job_id}/cancel"))
        timer.start()
        start = time.monotonic()
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            got = list(sse(r.iter_lines()))
        timer.join()
        assert time.monotonic() - start < 5
        assert sum(e.get("comment") == "keep-alive" for e in got) >= 2
        assert got[-1]["event"] == "end" and json.loads(got[-1]["data"])["state"] == "cancelled"


# ------------------------------------------------------------------------------------ R-30 auth
def test_auth_required_on_every_v1_route(client, monkeypatch):
    job = client.post("/v1/jobs", json=spec()).json()
    wrong = ["", "Bearer", "Bearer wrong", f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}",
             "Basic " + base64.b64encode(f"user:{KEYS[0]}".encode()).decode(), KEYS[0]]
    for method, path in V1_ROUTES:
        for header in wrong:
            r = client.request(method, path.format(id=job["id"]), json=spec(),
                               headers={"Authorization": header} if header else {"Authorization": ""})
            assert r.status_code == 401, (method, path, header)
            assert r.headers["www-authenticate"] == "Bearer"
            assert set(r.json()) == {"error", "detail"} and r.json()["error"] == "unauthorized"
            assert job["id"] not in r.text and "student" not in r.text
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200, path

    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for key, status in ((KEYS[0], 200), (KEYS[1], 200), ("nope", 401)):
        calls.clear()
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == status
        assert sorted(b for _, b in calls) == sorted(k.encode() for k in KEYS)  # every key, every time


# ------------------------------------------------------------------------------------ R-31 body limit
def _raw_request(url: str, head: str, body_parts: list[bytes]) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head.encode())
        for part in body_parts:
            s.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_body_over_limit_is_refused_before_it_is_read(settings, store):
    app = create_app(make_settings(settings.redis_url, settings.redis_prefix, _roots_of(settings),
                                   max_body_bytes=4096), store, ray_ping=lambda: True)
    with live_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n" \
               "Content-Type: application/json\r\n"
        # a declared length of 1 GB, and no body sent at all: answered at once
        start = time.monotonic()
        reply = _raw_request(url, head + "Content-Length: 1000000000\r\n\r\n", [])
        assert reply.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 3
        # chunked, 6 KB sent and the body never finished: answered once the count passes 4 KB
        chunk = b"%x\r\n%s\r\n" % (1000, b" " * 1000)
        reply = _raw_request(url, head + "Transfer-Encoding: chunked\r\n\r\n", [chunk] * 6)
        assert reply.startswith(b"HTTP/1.1 413")
        # through an ordinary client, both ways
        big = json.dumps(spec(name="x" * 10_000)).encode()
        r = http.post("/v1/jobs", content=big)
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        r = http.post("/v1/jobs", content=iter([big[:3000], big[3000:]]))  # no length: chunked
        assert r.status_code == 413 and "transfer-encoding" in r.request.headers
        # and the next request is fine
        assert http.post("/v1/jobs", json=spec()).status_code == 201
        assert len(http.get("/v1/jobs").json()["jobs"]) == 1


def _roots_of(settings: Settings) -> SimpleNamespace:
    return SimpleNamespace(models=Path(settings.model_roots[0]), data=Path(settings.data_roots[0]),
                           runs=Path(settings.runs_dir))


# ------------------------------------------------------------------------------------ R-32 schema fuzz
BAD_BODIES = {
    "empty": b"", "null": b"null", "list": b"[]", "string": b'"spec"', "number": b"1", "truncated": b'{"name":',
    "not utf-8": b'{"name": "\xff\xfe"}', "NaN": b'{"seed": NaN}', "Infinity": b'{"seed": Infinity}',
    "-Infinity": b'{"distill": {"lr": -Infinity}}', "1e999": b'{"distill": {"lr": 1e999}}',
    "huge int": b'{"seed": ' + b"9" * 5000 + b"}", "deep": b'{"x": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    "duplicate key": json.dumps(spec())[:-1].encode() + b', "name": "other"}',
}


def _with(doc: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return doc


WRONG = {
    "extra field": (("extra",), 1), "nested extra": (("distill", "nope"), 1),
    "string for int": (("seed",), "0"), "bool for int": (("seed",), True), "float for int": (("seed",), 1.5),
    "negative steps": (("distill", "steps"), -1), "zero workers": (("resources", "workers"), 0),
    "huge steps": (("distill", "steps"), 10**30), "bad loss": (("distill", "loss"), "mse"),
    "huge list": (("teacher", "endpoints"), ["127.0.0.1:1"] * 10_000), "list for str": (("name",), ["a"]),
    "object for float": (("distill", "lr"), {"a": 1}), "null required": (("student",), None),
    "two teachers": (("teacher", "endpoints"), ["127.0.0.1:1"]), "bad name": (("name",), "../x"),
    # would reach the Ray entrypoint as a flag (the job id starts with the name)
    "name like a flag": (("name",), "-x"), "name like a long flag": (("name",), "--help"),
    # checked at submit, not when the workers first dial the teacher
    "endpoint not host:port": (("teacher",), {"endpoints": ["http://teacher/score"]}),
    "endpoint port out of range": (("teacher",), {"endpoints": ["teacher:70000"]}),
    "endpoint like a flag": (("teacher",), {"endpoints": ["--teacher:1"]}),
    "endpoint twice": (("teacher",), {"endpoints": ["teacher:1", "teacher:1"]}),
}


@pytest.mark.parametrize("case", list(BAD_BODIES) + list(WRONG))
def test_bad_bodies_are_422(client, case):
    body = BAD_BODIES[case] if case in BAD_BODIES else json.dumps(_with(spec(), *WRONG[case])).encode()
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (case, r.text)
    assert r.json()["error"] == "invalid_spec"


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(node, dict):
        if prefix:
            yield prefix
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    else:
        yield prefix


def _at(doc: dict[str, Any], path: tuple, kind: type) -> bool:
    for k in path:
        doc = doc[k]
    return isinstance(doc, kind)


FULL = JobSpec.model_validate(spec()).model_dump(mode="json")
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
BAD_VALUES = (JSON | st.integers(min_value=-(2**80), max_value=2**80) | st.sampled_from([
    float("nan"), float("inf"), -float("inf"), 10**400, -1, 0, 2**63, 1e308, "", "../../etc/passwd", ["x"] * 5000]))


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_schema_fuzz_never_500(client, data):
    """R-32: a valid spec with one field replaced, added or removed, or random JSON: 200/201/400/
    422 only, never 500 (TestClient re-raises server errors), and the status is documented."""
    kind = data.draw(st.sampled_from(["replace", "add", "remove", "random"]))
    if kind == "random":
        doc = data.draw(JSON)
    else:
        if kind == "add":
            parent = data.draw(st.sampled_from([()] + [p for p in _paths(FULL) if _at(FULL, p, dict)]))
            doc = _with(FULL, parent + (data.draw(st.text(min_size=1, max_size=12)),), data.draw(BAD_VALUES))
        elif kind == "replace":
            doc = _with(FULL, data.draw(st.sampled_from(list(_paths(FULL)))), data.draw(BAD_VALUES))
        else:
            path = data.draw(st.sampled_from(list(_paths(FULL))))
            doc = json.loads(json.dumps(FULL))
            node = doc
            for k in path[:-1]:
                node = node[k]
            del node[path[-1]]
    r = client.post("/v1/jobs", content=json.dumps(doc, allow_nan=True).encode(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 201, 400, 422), r.text
    assert documented(client.app.openapi(), "POST", "/v1/jobs", r.status_code)


def test_openapi_is_valid_and_lists_every_route(client):
    doc = client.get("/openapi.json").json()
    validate_openapi(doc)
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {*((m, p.replace("{id}", "{job_id}")) for m, p in V1_ROUTES),
                   ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
    schemas = doc["components"]["schemas"]
    for name in ("JobSpec", "StudentSpec", "TeacherSpec", "DataSpec", "JobRecord", "JobList", "CancelResult",
                 "ErrorBody", "Readiness"):
        assert name in schemas, name
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    for method, path in V1_ROUTES:
        op = doc["paths"][path.replace("{id}", "{job_id}")][method.lower()]
        assert {"401", "422", "503"} <= set(op["responses"]) and op["security"], (method, path)
    for status in (200, 201, 400, 413, 422):
        assert documented(doc, "POST", "/v1/jobs", status)
    assert "text/event-stream" in doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]


# ------------------------------------------------------------------------------------ R-33 paths
def _traversals(r: SimpleNamespace) -> list[tuple[str, tuple, str]]:
    bad_models = ["../outside", "student/../../outside", str(r.outside), "/etc", "%2e%2e/outside",
                  "%252e%252e/outside", "..%2Foutside", "escape", "escape/secret.txt", str(r.evil), "../models-evil",
                  "student\x00/../..", str(r.data / "train.jsonl"), "", "x" * 5000]
    cases = [("student.model", ("student", "model"), v) for v in bad_models]
    cases += [("teacher.local_model", ("teacher", "local_model"), "../outside")]
    cases += [("data.path", ("data", "path"), v) for v in ("../outside/secret.txt", "leak.jsonl", str(r.secret),
                                                            "%2E%2E/outside/secret.txt", str(r.models / "student"))]
    cases += [("data.eval_path", ("data", "eval_path"), "../outside/secret.txt"),
              ("checkpoint.dir", ("checkpoint", "dir"), "../outside"),
              ("checkpoint.dir", ("checkpoint", "dir"), "/tmp"),
              ("resources.storage_path", ("resources", "storage_path"), "s3://bucket/run"),
              ("resources.storage_path", ("resources", "storage_path"), "../../outside"),
              ("teacher.token_env", ("teacher", "token_env"), "AWS_SECRET_ACCESS_KEY")]
    return cases


def test_paths_outside_the_roots_are_refused_untouched(client, roots, monkeypatch):
    before = (roots.secret.read_bytes(), os.stat(roots.secret))
    os.utime(roots.secret, ns=(before[1].st_mtime_ns - 10**12, before[1].st_mtime_ns))  # relatime would update
    before = (roots.secret.read_bytes(), os.stat(roots.secret))
    touched: list[str] = []
    outside = (str(roots.outside), "/etc", str(roots.evil))

    def spy(name: str, fn):
        def wrapper(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and str(path).startswith(outside):
                touched.append(f"{name} {path}")
            return fn(path, *args, **kwargs)
        return wrapper

    for mod, name in ((os, "stat"), (os, "open"), (os, "listdir"), (os, "scandir"), (os, "access"),
                      (builtins, "open")):
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    for field, path, value in _traversals(roots):
        r = client.post("/v1/jobs", json=_with(spec(), path, value))
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"] in ("path_refused", "unsafe_spec") and field in r.json()["detail"]
    monkeypatch.undo()
    assert touched == []
    after = (roots.secret.read_bytes(), os.stat(roots.secret))
    assert after[0] == before[0]
    assert (after[1].st_atime_ns, after[1].st_mtime_ns) == (before[1].st_atime_ns, before[1].st_mtime_ns)
    assert client.get("/v1/jobs").json()["jobs"] == []

    # inside the roots: a symlink that stays inside, a literal %-name (decoded "A", also inside), absolute
    (roots.models / "%41").mkdir()
    for value, stored in (("alias", roots.models / "student"), ("%41", roots.models / "%41"),
                          (str(roots.models / "teacher"), roots.models / "teacher")):
        r = client.post("/v1/jobs", json=spec(student={"model": value}))
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["student"]["model"] == str(stored)


def test_no_roots_configured_refuses_every_path(redis_url, redis_prefix, roots):
    for kw, env in (({"model_roots": ()}, "DISTILLERY_MODEL_ROOTS"), ({"data_roots": ()}, "DISTILLERY_DATA_ROOTS")):
        app = create_app(make_settings(redis_url, redis_prefix, roots, **kw), ray_ping=lambda: True)
        with TestClient(app, headers=AUTH) as c:
            r = c.post("/v1/jobs", json=spec())
        assert r.status_code == 400 and env in r.json()["detail"]


# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", [(), ("teacher",), ("student",), ("distill",)])
def test_trust_remote_code_is_refused(client, where):
    for key in ("trust_remote_code", "Trust-Remote-Code"):
        for value in (True, False):
            doc = _with(spec(), where + (key,), value)
            r = client.post("/v1/jobs", json=doc)
            assert r.status_code == 400 and r.json()["error"] == "unsafe_spec", r.text
            assert "trust_remote_code" in r.json()["detail"]
    nested = spec(teacher={"local_model": None, "ray_actor": {"model": "teacher", "trust_remote_code": True}})
    assert client.post("/v1/jobs", json=nested).status_code == 400
    in_list = spec(teacher={"local_model": None, "endpoints": [{"trust_remote_code": True}]})
    assert client.post("/v1/jobs", json=in_list).status_code == 400


# ------------------------------------------------------------------------------------ R-23 Redis
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_503_everywhere(client: TestClient, job_id: str) -> None:
    for method, path in V1_ROUTES:
        start = time.monotonic()
        r = client.request(method, path.format(id=job_id), json=spec())
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable", (method, path, r.text)
        assert time.monotonic() - start < 3 and r.headers["retry-after"]
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "not_ready", "redis": False, "ray": True}
    assert client.get("/healthz").status_code == 200


def test_redis_down_answers_503_promptly(roots):
    settings = make_settings(f"redis://127.0.0.1:{_closed_port()}/0", "down", roots)
    with TestClient(create_app(settings, ray_ping=lambda: True), headers=AUTH) as client:
        _assert_503_everywhere(client, "some-job")
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "distillery_store_up 0.0" in metrics.text


def test_redis_restart_keeps_acknowledged_jobs(redis_process, roots):
    server = redis_process("--appendonly", "yes").start()
    settings = make_settings(server.url, "restart", roots)
    with TestClient(create_app(settings, ray_ping=lambda: True), headers=AUTH) as client:
        ids = []
        for i in range(5):
            r = client.post("/v1/jobs", json=spec(name=f"keep{i}"))
            assert r.status_code == 201
            ids.append(r.json()["id"])
        server.stop(signal.SIGTERM)
        _assert_503_everywhere(client, ids[0])
        server.start()
        assert client.get("/readyz").status_code == 200
        assert all(client.get(f"/v1/jobs/{i}").json()["state"] == "queued" for i in ids)
        assert {j["id"] for j in client.get("/v1/jobs").json()["jobs"]} == set(ids)
        assert client.post("/v1/jobs", json=spec()).status_code == 201


def test_redis_paused_answers_503_within_the_socket_timeout(redis_process, roots):
    """A Redis that accepts but never answers (SIGSTOP) costs one 5 s socket timeout, not a hang."""
    server = redis_process().start()
    settings = make_settings(server.url, "paused", roots)
    with TestClient(create_app(settings, ray_ping=lambda: True), headers=AUTH) as client:
        job_id = client.post("/v1/jobs", json=spec()).json()["id"]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            r = client.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 503 and time.monotonic() - start < 8
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"


# ------------------------------------------------------------------------------------ probes, serve
def test_readyz_follows_ray(settings, store):
    for ping, status, ray in ((lambda: True, 200, True), (lambda: False, 503, False), (lambda: 1 / 0, 503, False)):
        with TestClient(create_app(settings, store, ray_ping=ping)) as c:
            r = c.get("/readyz")
        assert r.status_code == status and r.json()["ray"] is ray and r.json()["redis"] is True


def test_metrics_count_requests_and_jobs(client):
    client.post("/v1/jobs", json=spec())
    client.get("/v1/jobs/missing-1")
    client.get("/v1/jobs/missing-2")
    text = client.get("/metrics").text
    assert 'distillery_api_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 2.0' in text
    assert 'distillery_api_requests_total{method="POST",route="/v1/jobs",status="201"} 1.0' in text
    assert 'distillery_jobs{state="queued"} 1.0' in text
    assert "distillery_api_request_duration_seconds_bucket" in text


def test_serve_refuses_exposed_host_without_keys(monkeypatch):
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    for settings, host in ((Settings(api_host="0.0.0.0"), None), (Settings(), "0.0.0.0"), (Settings(), "10.1.2.3")):
        with pytest.raises(InsecureConfig, match="DISTILLERY_API_KEYS"):
            serve(settings, host, 8000)
    with pytest.raises(InsecureConfig):
        create_app(Settings(api_host="0.0.0.0"))
    serve(Settings(api_host="0.0.0.0", api_keys=("k",)), None, 8123)
    serve(Settings(api_host="0.0.0.0"), "127.0.0.1", 8124)
    assert [(kw["host"], kw["port"]) for kw in started] == [("0.0.0.0", 8123), ("127.0.0.1", 8124)]
    assert api.check_exposure(Settings()) is None


# ------------------------------------------------------------------------------------ issue 15: CLI and first run
def test_a_new_job_answers_201_with_its_location(client):
    r = client.post("/v1/jobs", json=spec(), headers={**AUTH, "Idempotency-Key": "loc-1"})
    assert r.status_code == 201 and r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
    assert client.get(r.headers["Location"]).json()["id"] == r.json()["id"]
    again = client.post("/v1/jobs", json=spec(), headers={**AUTH, "Idempotency-Key": "loc-1"})
    assert again.status_code == 200 and "Location" not in again.headers


def test_jobs_limit_is_the_shared_bound(client):
    from services.defaults import JOBS_PAGE_MAX

    assert client.get("/v1/jobs", params={"limit": JOBS_PAGE_MAX}).status_code == 200
    assert client.get("/v1/jobs", params={"limit": JOBS_PAGE_MAX + 1}).status_code == 422


def cli_against(client: TestClient, monkeypatch) -> Any:
    """services.cli with its API client talking to the in-process app."""
    import services.cli as cli
    from services.apiclient import ApiClient

    api_client = ApiClient("http://testserver")
    api_client.http = client  # TestClient is an httpx.Client
    monkeypatch.setattr(cli, "_client", lambda url, key: api_client)
    return cli


def test_logs_of_a_queued_job_say_it_has_no_events_yet(client, monkeypatch):
    from typer.testing import CliRunner

    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"})
    got = [e for e in sse(r.text.splitlines()) if "data" in e]
    assert [e["event"] for e in got] == ["backlog_end"]
    assert json.loads(got[0]["data"]) == {"kind": "backlog_end", "id": job_id, "state": "queued",
                                          "detail": "the job is queued and has no events yet"}
    result = CliRunner().invoke(cli_against(client, monkeypatch).app, ["logs", job_id])
    assert result.exit_code == 0 and [json.loads(line)["kind"] for line in result.stdout.splitlines()] == ["backlog_end"]


def test_cli_submit_of_an_invalid_spec_names_the_field(client, roots, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec(distill={"loss": "nope"})))  # JSON is YAML
    result = CliRunner().invoke(cli_against(client, monkeypatch).app, ["submit", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: HTTP 422: the job spec does not validate; distill.loss: Input should be")
    assert len(result.stderr.splitlines()) == 1
