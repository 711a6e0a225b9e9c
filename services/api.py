"""REST API of the job service: submit, list, inspect, follow (SSE) and cancel distillation jobs.

    distillery api --host 127.0.0.1 --port 8000          # = serve(Settings.from_env(), host, port)
    curl -H "Authorization: Bearer $KEY" localhost:8000/v1/jobs --data @spec.json
    curl -N -H "Authorization: Bearer $KEY" localhost:8000/v1/jobs/$ID/events

Three layers (STYLE 1): the router turns HTTP into calls on `JobService`; `JobService` parses and
checks a spec, applies the path policy and talks to `JobStore`; the store talks to Redis. Every
error becomes a status code in one function, `error_response` (STYLE 7).

Request policy (ARCHITECTURE §6, RELIABILITY R-30..R-34):
- Bearer keys from DISTILLERY_API_KEYS, compared with hmac.compare_digest against every key; with
  no keys the API is open, which `serve` allows on loopback only. /healthz, /readyz, /metrics and
  the OpenAPI document are always open.
- Bodies over DISTILLERY_MAX_BODY_BYTES get 413 before they are read whole (ASGI middleware).
- The body is strict JSON (no NaN/Infinity, no duplicate keys, finite numbers) validated by JobSpec
  in strict mode; `trust_remote_code` anywhere in it is refused with 400.
- Model paths (student.model, teacher.local_model, teacher.ray_actor.model) must resolve inside
  DISTILLERY_MODEL_ROOTS, data paths (data.path, data.eval_path) inside DISTILLERY_DATA_ROOTS; with
  no roots configured every path is refused. A relative path is relative to the first root of its
  kind. Both the path as given and its URL-decoded form must resolve (symlinks followed) inside a
  root; nothing outside is opened, stat-ed or listed, and the stored spec holds the resolved path.
- Run directory: checkpoint.dir and a local resources.storage_path are where the workers write (and
  delete), so they must resolve inside DISTILLERY_RUNS_DIR (relative = relative to it); storage URIs
  are refused. The scheduler gives each job its own directory, <runs_dir>/<job id>, at submission.
- teacher.token_env names an environment variable the workers send to the teacher endpoints the
  request chose, so only names starting with DISTILLERY_TEACHER_TOKEN are accepted.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import os
import re
import time
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Literal
from urllib.parse import unquote

import anyio
import redis
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from services.settings import Settings
from services.store import STATES, TERMINAL, Job, JobNotFound, JobStore, StoreUnavailable, TransitionRefused
from student_worker.config import JobSpec

log = logging.getLogger(__name__)

JOB_ID = r"^[A-Za-z0-9._-]{1,80}$"
EVENT_ID = r"^[0-9]{1,20}(-[0-9]{1,20})?$"
IDEMPOTENCY_KEY = r"^[A-Za-z0-9._:-]{1,128}$"
TOKEN_ENV = re.compile(r"^DISTILLERY_TEACHER_TOKEN[A-Z0-9_]{0,64}$")
MAX_PATH_BYTES = 4096
JobId = Annotated[str, PathParam(pattern=JOB_ID, description="Job id as returned by POST /v1/jobs.")]
State = Literal["queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled"]


# ---------------------------------------------------------------------------------- protocol
class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where in the request the problem is.")
    msg: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable code: unauthorized, not_found, invalid_spec, ...")
    detail: str = Field(description="What went wrong, for a person. Never holds job data.")
    errors: list[ErrorItem] | None = Field(None, description="Validation problems, one per field (422).")


class JobRecord(BaseModel):
    id: str
    state: State
    attempt: int = Field(description="Claims so far; each scheduler claim adds one.")
    spec: dict[str, Any] = Field(description="The JobSpec as accepted: defaults filled, paths resolved.")
    name: str
    created_at: float = Field(description="Unix time, seconds.")
    updated_at: float = Field(description="Unix time, seconds.")
    owner: str = Field(description="Scheduler holding the job's lease, if any.")
    submission_id: str = Field(description="Ray Job submission id once submitted.")
    error: str
    reason: str
    failures: int = Field(description="Attempts that ended without finishing (lease lapsed, worker lost).")
    progress: dict[str, Any] = Field(description="Latest stage, step, loss and tokens/s.")
    summary: dict[str, Any] = Field(description="Final metrics and eval once the job ends.")
    checkpoint: str = Field(description="Latest checkpoint path.")

    @classmethod
    def of(cls, job: Job) -> "JobRecord":
        return cls(**dataclasses.asdict(job))


class JobList(BaseModel):
    jobs: list[JobRecord] = Field(description="Newest first.")
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last page.")


class CancelResult(BaseModel):
    id: str
    state: State = Field(description="cancelled (was queued), cancelling (the scheduler stops it) or cancelled.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    ray: bool


# ---------------------------------------------------------------------------------- errors
class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class PathRefused(ApiError):
    status, code = 400, "path_refused"


class UnsafeSpec(ApiError):
    status, code = 400, "unsafe_spec"


class AlreadyEnded(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class InvalidSpec(ApiError):
    status, code = 422, "invalid_spec"


class InsecureConfig(ValueError):
    """serve() refuses to expose the API without keys."""


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"loc": [p if isinstance(p, (str, int)) else str(p) for p in e.get("loc", ())],
             "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]


def error_response(exc: Exception) -> JSONResponse:
    """The one place where an error becomes an HTTP status (STYLE 7). Bodies carry a code and a
    fixed or request-derived message, never another job's data."""
    headers: dict[str, str] = {}
    errors = None
    if isinstance(exc, ApiError):
        status, code, detail, errors = exc.status, exc.code, str(exc), exc.errors
    elif isinstance(exc, RequestValidationError):
        status, code, detail = 422, "invalid_request", "request parameters or headers are invalid"
        errors = _clean_errors(list(exc.errors()))
    elif isinstance(exc, JobNotFound):
        status, code, detail = 404, "not_found", "no such job"
    elif isinstance(exc, TransitionRefused):
        status, code, detail = 409, "conflict", "the job's state does not allow this"
    elif isinstance(exc, StoreUnavailable):
        log.warning("job store unavailable: %s", exc)
        status, code, detail = 503, "store_unavailable", "the job store (Redis) is unavailable; retry later"
        headers["Retry-After"] = "2"
    elif isinstance(exc, StarletteHTTPException):
        status, code, detail = exc.status_code, "http_error", str(exc.detail)
        headers.update(exc.headers or {})
    else:
        log.error("unhandled error", exc_info=exc)
        status, code, detail = 500, "internal", "internal error"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 413:  # the rest of the body is never read, so the connection cannot be reused
        headers["Connection"] = "close"
    body = ErrorBody(error=code, detail=detail, errors=errors).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer key."},
    422: {"model": ErrorBody, "description": "The request does not validate."},
    503: {"model": ErrorBody, "description": "Redis is unavailable."},
}


# ---------------------------------------------------------------------------------- spec checks
def _reject_constant(name: str) -> None:
    raise InvalidSpec(f"{name} is not allowed in a job spec")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidSpec(f"number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidSpec(f"duplicate key {k[:64]!r}")
        out[k] = v
    return out


def parse_json(raw: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, no NaN/Infinity, finite numbers, no duplicate keys, an object."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite,
                          object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # huge ints raise ValueError
        raise InvalidSpec(f"body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidSpec(f"a job spec is a JSON object, got {type(data).__name__}")
    return data


def refuse_trust_remote_code(data: Any) -> None:
    """R-34: the operator sets trust_remote_code on the teacher server, never a request."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            here = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and k.lower().replace("-", "_") == "trust_remote_code":
                raise UnsafeSpec(f"trust_remote_code cannot come from a request (found at {here[:200]}); "
                                 "remote code is an operator's decision on the teacher server")
            stack.append((here, v))


class PathPolicy:
    """Paths of one kind must resolve inside the configured roots (R-33). A path that is outside
    by its text is refused without a look at the filesystem; one inside by its text is resolved
    with os.path.realpath, whose lstat/readlink calls are the only filesystem access (nothing is
    opened, stat-ed or listed; Path.resolve would stat the result)."""

    def __init__(self, roots: tuple[str, ...], env: str, what: str) -> None:
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self.env, self.what = env, what

    def resolve(self, field: str, raw: str) -> str:
        if not self.roots:
            raise PathRefused(f"{field}: no {self.what} roots are configured; the operator sets {self.env} "
                              f"(comma-separated directories) before {self.what} paths are accepted")
        if not raw.strip() or "\x00" in raw or len(raw.encode("utf-8", "replace")) > MAX_PATH_BYTES:
            raise PathRefused(f"{field}: not a usable path")
        forms = [raw]
        while (decoded := unquote(forms[-1])) != forms[-1]:
            if len(forms) > 4:
                raise PathRefused(f"{field}: too many levels of URL encoding")
            forms.append(decoded)
        return str([self._resolve(field, raw, f) for f in forms][0])

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def _resolve(self, field: str, raw: str, form: str) -> Path:
        joined = os.path.join(self.roots[0], form)  # relative to the first root; absolute stays
        if self._inside(Path(os.path.normpath(joined))):
            try:
                real = Path(os.path.realpath(joined))
            except (OSError, ValueError):
                raise PathRefused(f"{field}: the path cannot be resolved") from None
            if self._inside(real):
                return real
        shown = ", ".join(map(str, self.roots))
        raise PathRefused(f"{field} {raw[:200]!r} resolves outside the {self.what} roots ({shown})")


# ---------------------------------------------------------------------------------- service
class JobService:
    """Validates and orchestrates; returns typed results or raises the errors above."""

    def __init__(self, settings: Settings, store: JobStore, ray_ping: Callable[[], bool],
                 block_ms: int = 1000) -> None:
        self.store, self.ray_ping, self.block_ms = store, ray_ping, block_ms
        self.models = PathPolicy(settings.model_roots, "DISTILLERY_MODEL_ROOTS", "model")
        self.data = PathPolicy(settings.data_roots, "DISTILLERY_DATA_ROOTS", "data")
        self.runs = PathPolicy((settings.runs_dir,), "DISTILLERY_RUNS_DIR", "run")

    def accept(self, raw: bytes) -> JobSpec:
        """Body bytes -> a JobSpec whose paths passed the policy (resolved, absolute)."""
        data = parse_json(raw)
        refuse_trust_remote_code(data)
        try:
            spec = JobSpec.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            raise InvalidSpec("the job spec does not validate", _clean_errors(list(errors))) from None
        s, t, d, res = spec.student, spec.teacher, spec.data, spec.resources
        s.model = self.models.resolve("student.model", s.model)
        if t.local_model is not None:
            t.local_model = self.models.resolve("teacher.local_model", t.local_model)
        if t.ray_actor is not None:
            t.ray_actor.model = self.models.resolve("teacher.ray_actor.model", t.ray_actor.model)
        d.path = self.data.resolve("data.path", d.path)
        if d.eval_path is not None:
            d.eval_path = self.data.resolve("data.eval_path", d.eval_path)
        spec.checkpoint.dir = self.runs.resolve("checkpoint.dir", spec.checkpoint.dir)
        if res.storage_path is not None:
            if "://" in res.storage_path:
                raise PathRefused("resources.storage_path: storage URIs cannot come from a request")
            res.storage_path = self.runs.resolve("resources.storage_path", res.storage_path)
        if t.token_env is not None and not TOKEN_ENV.match(t.token_env):
            raise UnsafeSpec("teacher.token_env must name a variable starting with DISTILLERY_TEACHER_TOKEN "
                             "(its value is sent to the teacher endpoints)")
        return spec

    def submit(self, raw: bytes, idempotency_key: str | None) -> tuple[Job, bool]:
        doc = self.accept(raw).model_dump(mode="json")
        job_id, created = self.store.create(doc, name=doc["name"], idempotency_key=idempotency_key)
        job = self.store.get(job_id)
        if not created and job.spec != doc:
            raise InvalidSpec("this Idempotency-Key was used for a different job spec")
        return job, created

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self, state: str | None, offset: int, limit: int) -> list[Job]:
        return self.store.list(state=state, offset=offset, limit=limit)

    def cancel(self, job_id: str) -> str:
        state = self.store.request_cancel(job_id)
        if state in ("succeeded", "failed"):
            raise AlreadyEnded(f"the job already ended: {state}")
        return state

    def poll_events(self, job_id: str, after: str, follow: bool = True
                    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """Events after `after` (waiting up to block_ms when following a live job), and the state
        to end on once the stream is drained. The state is read first: a terminal state's own event
        is written with it, so an empty read after it means nothing is left."""
        state = self.store.get(job_id).state
        stop = state in TERMINAL or not follow
        batch = self.store.events(job_id, after, block_ms=None if stop else self.block_ms)
        return batch, state if stop and not batch else None

    def readiness(self) -> Readiness:
        redis_ok = self.store.ping()
        try:
            ray_ok = bool(self.ray_ping())
        except Exception:  # a probe that raises is a probe that failed
            ray_ok = False
        return Readiness(status="ready" if redis_ok and ray_ok else "not_ready", redis=redis_ok, ray=ray_ok)

    def count_by_state(self, cap: int = 100_000) -> dict[str, int]:
        # Uses the store's client and key layout (HGET state per job, pipelined) instead of
        # store.list, which would fetch every spec on each scrape. Belongs in JobStore eventually.
        r, keys, counts, page = self.store.r, self.store.k, dict.fromkeys(STATES, 0), 1000
        try:
            for start in range(0, cap, page):
                ids = r.zrange(keys.index, start, start + page - 1)
                if not ids:
                    break
                pipe = r.pipeline(transaction=False)
                for i in ids:
                    pipe.hget(keys.job(i.decode()), "state")
                for state in pipe.execute():
                    if state is not None and state.decode() in counts:
                        counts[state.decode()] += 1
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(str(exc)) from None
        return counts


def http_ray_ping(address: str, timeout_s: float = 2.0) -> Callable[[], bool]:
    """Ray is reachable when its dashboard (the Jobs API the scheduler uses) answers."""
    url = address.rstrip("/") + "/api/version"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def ping() -> bool:
        try:
            with opener.open(url, timeout=timeout_s) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

    return ping


# ---------------------------------------------------------------------------------- middleware
def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


async def _send_error(send: Callable, exc: Exception) -> None:
    response = error_response(exc)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class BodyLimit:
    """413 before the body is read whole: a declared Content-Length over the limit is refused
    without reading, and a chunked body is counted as it arrives (R-31)."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = TooLarge(f"request body over {self.max_bytes} bytes")
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, ApiError("bad Content-Length"))
            if int(declared) > self.max_bytes:
                return await _send_error(send, too_large)
        seen, started = 0, False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except TooLarge:
            if started:
                raise
            await _send_error(send, too_large)


class Metrics:
    """Request counts and latency by route template, method and status (pure ASGI)."""

    METHODS = {"GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"}

    def __init__(self, app: Callable, routes: list[BaseRoute], registry: CollectorRegistry) -> None:
        self.app, self.routes = app, routes
        self.requests = Counter("distillery_api_requests", "HTTP requests served.",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("distillery_api_request_duration_seconds", "Time to the end of the response.",
                                 ["route", "method"], registry=registry)

    def _route(self, scope: dict[str, Any]) -> str:
        for route in self.routes:  # also before routing, so a 413 from BodyLimit gets its route
            if route.matches(scope)[0] != Match.NONE:
                return getattr(route, "path", "other")
        return "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, start, status = self._route(scope), time.perf_counter(), 500
        method = scope["method"] if scope["method"] in self.METHODS else "other"

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.requests.labels(route, method, str(status)).inc()
            self.latency.labels(route, method).observe(time.perf_counter() - start)


class JobsCollector:
    def __init__(self, service: JobService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("distillery_store_up", "1 when Redis answered the last scrape.")
        try:
            counts = self.service.count_by_state()
        except StoreUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        jobs = GaugeMetricFamily("distillery_jobs", "Jobs by state.", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield from (up, jobs)


# ---------------------------------------------------------------------------------- transport
def _auth(keys: tuple[str, ...]) -> Callable[..., None]:
    encoded = [k.encode() for k in keys]
    bearer = HTTPBearer(auto_error=False, description="An API key from DISTILLERY_API_KEYS.")

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not encoded:
            return
        token = credentials.credentials.encode() if credentials else b""
        matched = False
        for key in encoded:  # every key, no early exit: the time does not depend on which matched
            matched |= hmac.compare_digest(token, key)
        if not matched:
            raise Unauthorized("missing or invalid bearer key")

    return require_key


async def _raw_body(request: Request) -> bytes:
    return await request.body()


def _format_event(entry_id: str, event: dict[str, Any]) -> str:
    kind = str(event.get("kind", "message"))
    kind = kind if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", kind) else "message"
    return f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(event, default=str)}\n\n"


def _router(service: JobService, settings: Settings, heartbeat_s: float) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(settings.api_keys))],
                   responses=ERROR_RESPONSES, tags=["jobs"])
    not_found = {404: {"model": ErrorBody, "description": "No such job."}}
    spec_body = {"requestBody": {"required": True, "description": "A job spec (student_worker.config.JobSpec).",
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}}
    limiter: list[anyio.CapacityLimiter] = []  # created inside the event loop, on first use

    @v1.post("/jobs", status_code=201, response_model=JobRecord, openapi_extra=spec_body, responses={
        200: {"model": JobRecord, "description": "Repeat of an earlier request with the same Idempotency-Key."},
        400: {"model": ErrorBody, "description": "A path outside the roots, or trust_remote_code."},
        413: {"model": ErrorBody, "description": "Body over the size limit."}})
    def submit(response: Response, body: bytes = Depends(_raw_body),
               idempotency_key: str | None = Header(None, alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY,
                                                    description="Repeat-safe submission: same key, same job (24 h).")
               ) -> JobRecord:
        """Queue a distillation job."""
        job, created = service.submit(body, idempotency_key)
        response.status_code = 201 if created else 200
        return JobRecord.of(job)

    @v1.get("/jobs", response_model=JobList)
    def list_jobs(state: State | None = Query(None, description="Only jobs in this state."),
                  offset: int = Query(0, ge=0, le=10_000), limit: int = Query(50, ge=1, le=200)) -> JobList:
        """Jobs, newest first."""
        jobs = service.list(state, offset, limit)
        return JobList(jobs=[JobRecord.of(j) for j in jobs], offset=offset, limit=limit,
                       next_offset=offset + len(jobs) if len(jobs) == limit else None)

    @v1.get("/jobs/{job_id}", response_model=JobRecord, responses=not_found)
    def get_job(job_id: JobId) -> JobRecord:
        """One job."""
        return JobRecord.of(service.get(job_id))

    @v1.post("/jobs/{job_id}/cancel", response_model=CancelResult, responses={
        **not_found, 409: {"model": ErrorBody, "description": "The job already succeeded or failed."}})
    def cancel(job_id: JobId) -> CancelResult:
        """Cancel a job: a queued one at once, a running one through the scheduler."""
        return CancelResult(id=job_id, state=service.cancel(job_id))

    @v1.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses={
        **not_found, 200: {"description": "Server-Sent Events: `id` is the stream id, `event` the kind, `data` "
                                          "the event as JSON; `: keep-alive` comments while idle; a last "
                                          "`end` event carries the terminal state.",
                           "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def events(job_id: JobId,
                     after: str | None = Query(None, pattern=EVENT_ID, description="Stream id to start after."),
                     follow: bool = Query(True, description="false: send the backlog, then end."),
                     last_event_id: str | None = Header(None, alias="Last-Event-ID", pattern=EVENT_ID)
                     ) -> StreamingResponse:
        """The job's events: the backlog, then live ones, until the job ends. A reconnecting client
        resumes after its Last-Event-ID header (which wins over `after`)."""
        await anyio.to_thread.run_sync(service.get, job_id)  # 404 / 503 before the stream starts
        if not limiter:  # SSE polls get their own threads so followers cannot starve other requests
            limiter.append(anyio.CapacityLimiter(64))
        return StreamingResponse(_stream(service, job_id, last_event_id or after or "0", follow, heartbeat_s,
                                         limiter[0]),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return v1


async def _stream(service: JobService, job_id: str, after: str, follow: bool, heartbeat_s: float,
                  limiter: anyio.CapacityLimiter) -> AsyncIterator[str]:
    yield "retry: 3000\n\n"
    last_sent = time.monotonic()
    while True:
        try:
            batch, final = await anyio.to_thread.run_sync(service.poll_events, job_id, after, follow,
                                                        limiter=limiter)
        except (StoreUnavailable, JobNotFound) as exc:  # the status line is gone; say it in the stream
            yield f"event: error\ndata: {error_response(exc).body.decode()}\n\n"
            return
        for entry_id, event in batch:
            after = entry_id
            yield _format_event(entry_id, event)
        if batch:
            last_sent = time.monotonic()
        elif final is not None:
            yield f"event: end\ndata: {json.dumps({'kind': 'end', 'id': job_id, 'state': final})}\n\n"
            return
        elif time.monotonic() - last_sent >= heartbeat_s:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"


def _probes(service: JobService, registry: CollectorRegistry) -> APIRouter:
    probes = APIRouter(tags=["operations"])

    @probes.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """The process is alive."""
        return Health()

    @probes.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    def readyz(response: Response) -> Readiness:
        """Redis and Ray are reachable."""
        ready = service.readiness()
        response.status_code = 200 if ready.status == "ready" else 503
        return ready

    @probes.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                                 "description": "Prometheus text format."}})
    def metrics() -> Response:
        """Prometheus metrics: requests by route and status, latency, jobs by state."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return probes


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(spec.pop("$defs", {}))
            schemas["JobSpec"] = spec
            app.openapi_schema = doc
        return app.openapi_schema

    return build


def check_exposure(settings: Settings) -> None:
    if settings.exposed and not settings.api_keys:
        raise InsecureConfig(f"refusing to serve the API on {settings.api_host} without API keys: set "
                             "DISTILLERY_API_KEYS (comma-separated) or bind to 127.0.0.1")


def create_app(settings: Settings, store: JobStore | None = None, ray_ping: Callable[[], bool] | None = None,
               *, sse_block_ms: int = 1000, sse_heartbeat_s: float = 15.0) -> FastAPI:
    """The API over `store` (default: Redis at settings.redis_url). `ray_ping` answers /readyz's
    Ray half (default: the Ray dashboard at settings.ray_address answers)."""
    check_exposure(settings)
    owned = store is None
    store = store or JobStore(settings.redis_url, settings.redis_prefix, settings.events_max)
    service = JobService(settings, store, ray_ping or http_ray_ping(settings.ray_address), block_ms=sse_block_ms)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            store.r.close()

    app = FastAPI(title="Distillery", version="0.1.0", lifespan=lifespan,
                  description="On-policy knowledge distillation jobs: submit, follow, cancel.")
    registry = CollectorRegistry()
    registry.register(JobsCollector(service))
    routers = [_router(service, settings, sse_heartbeat_s), _probes(service, registry)]
    for router in routers:
        app.include_router(router)
    for exc_type in (ApiError, RequestValidationError, JobNotFound, TransitionRefused, StoreUnavailable,
                     StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, lambda request, exc: error_response(exc))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Metrics, routes=[r for router in routers for r in router.routes], registry=registry)  # outermost: counts 413s too
    app.openapi = _openapi(app)
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn until SIGINT/SIGTERM. Raises InsecureConfig on a non-loopback host
    without API keys."""
    import uvicorn

    settings = dataclasses.replace(settings, api_host=host or settings.api_host,
                                   api_port=settings.api_port if port is None else port)
    check_exposure(settings)
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, server_header=False,
                timeout_graceful_shutdown=10, log_level="info")
