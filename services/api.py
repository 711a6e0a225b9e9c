"""REST API of the job service: submit, list, inspect, follow (SSE) and cancel distillation jobs.

    distillery api --host 127.0.0.1 --port 8000          # = serve(Settings.from_env(), host, port)
    curl -H "Authorization: Bearer $KEY" localhost:8000/v1/jobs --data @spec.json
    curl -N -H "Authorization: Bearer $KEY" localhost:8000/v1/jobs/$ID/events

Three layers (STYLE 1): the router turns HTTP into calls on `JobService`; `JobService` parses and
checks a spec, applies the path policy and talks to `JobStore`; the store talks to Redis. Every
error becomes a status code in one function, `error_response` (STYLE 7).

Request policy (R-30..R-34, docs/reliability.md):
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
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from services.defaults import JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX
from services.settings import Settings
from services.store import TERMINAL, JobNotFound, JobStore, StoreUnavailable, TransitionRefused
from student_worker.config import JobSpec

from services.protocol import (
    ApiError,
    CancelResult,
    error_response,
    ERROR_RESPONSES,
    ErrorBody,
    EVENT_ID,
    Health,
    IDEMPOTENCY_KEY,
    InsecureConfig,
    JobId,
    JobList,
    JobRecord,
    Readiness,
    State,
    TooLarge,
    Unauthorized,
)
from services.jobs import JobService
from services.rayapi import Cluster, http_ray_ping

log = logging.getLogger(__name__)

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


def _last_event(job_id: str, state: str, sent: int, resumed: bool) -> str:
    """`end` once the job has ended; a `backlog_end` for one that has not (follow=false), so
    that a queued job's empty stream does not read as a finished job."""
    if state in TERMINAL:
        return f"event: end\ndata: {json.dumps({'kind': 'end', 'id': job_id, 'state': state})}\n\n"
    if sent:
        detail = f"the job is {state}; these are its events so far (follow=true streams the rest)"
    else:
        detail = f"the job is {state} and has no {'new ' if resumed else ''}events yet"
    body = {"kind": "backlog_end", "id": job_id, "state": state, "detail": detail}
    return f"event: backlog_end\ndata: {json.dumps(body)}\n\n"


def _router(service: JobService, settings: Settings, heartbeat_s: float) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(settings.api_keys))],
                   responses=ERROR_RESPONSES, tags=["jobs"])
    not_found = {404: {"model": ErrorBody, "description": "No such job."}}
    spec_body = {"requestBody": {"required": True, "description": "A job spec (student_worker.config.JobSpec).",
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}}
    limiter: list[anyio.CapacityLimiter] = []  # created inside the event loop, on first use

    @v1.post("/jobs", status_code=201, response_model=JobRecord, openapi_extra=spec_body, responses={
        201: {"description": "Queued: the new job.",
              "headers": {"Location": {"description": "The job's URL, /v1/jobs/{id}.", "schema": {"type": "string"}}}},
        200: {"model": JobRecord, "description": "Repeat of an earlier request with the same Idempotency-Key."},
        400: {"model": ErrorBody, "description": "A path outside the roots, or trust_remote_code."},
        413: {"model": ErrorBody, "description": "Body over the size limit."},
        422: {"model": ErrorBody, "description": "The spec does not validate (invalid_spec), or the job asks for "
                                                 "more than the cluster has in all (does_not_fit)."}})
    def submit(response: Response, body: bytes = Depends(_raw_body),
               idempotency_key: str | None = Header(None, alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY,
                                                    description="Repeat-safe submission: same key, same job (24 h).")
               ) -> JobRecord:
        """Queue a distillation job; a new one answers 201 with its URL in `Location`."""
        job, created = service.submit(body, idempotency_key)
        response.status_code = 201 if created else 200
        if created:
            response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobRecord.of(job)

    @v1.get("/jobs", response_model=JobList)
    def list_jobs(state: State | None = Query(None, description="Only jobs in this state."),
                  offset: int = Query(0, ge=0, le=10_000),
                  limit: int = Query(JOBS_PAGE_DEFAULT, ge=1, le=JOBS_PAGE_MAX)) -> JobList:
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

    @v1.post("/jobs/{job_id}/resume", response_model=JobRecord, responses={
        **not_found, 409: {"model": ErrorBody, "description": "Only a failed or cancelled job resumes."}})
    def resume(job_id: JobId) -> JobRecord:
        """Queue a failed or cancelled job again: its next attempt carries on from the last
        checkpoint of the earlier ones (same run directory)."""
        return JobRecord.of(service.resume(job_id))

    @v1.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses={
        **not_found, 200: {"description": "Server-Sent Events: `id` is the stream id, `event` the kind, `data` "
                                          "the event as JSON; `: keep-alive` comments while idle; a last "
                                          "`end` event carries the terminal state. With follow=false "
                                          "on a job that has not ended, a last `backlog_end` event "
                                          "carries its state and says so instead.",
                           "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def events(job_id: JobId,
                     after: str | None = Query(None, pattern=EVENT_ID, description="Stream id to start after."),
                     follow: bool = Query(True, description="false: send the backlog, then end (with "
                                                          "`backlog_end` when the job has not ended)."),
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
    start, last_sent, sent = after, time.monotonic(), 0
    while True:
        try:
            batch, final = await anyio.to_thread.run_sync(service.poll_events, job_id, after, follow,
                                                        limiter=limiter)
        except (StoreUnavailable, JobNotFound) as exc:  # the status line is gone; say it in the stream
            yield f"event: error\ndata: {error_response(exc).body.decode()}\n\n"
            return
        for entry_id, event in batch:
            after = entry_id
            sent += 1
            yield _format_event(entry_id, event)
        if batch:
            last_sent = time.monotonic()
        elif final is not None:
            yield _last_event(job_id, final, sent, resumed=start != "0")
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

    @probes.get("/readyz", response_model=Readiness, response_model_exclude_none=True,
                responses={503: {"model": Readiness}})
    def readyz(response: Response) -> Readiness:
        """Redis and Ray are reachable, and the teacher SERVING when DISTILLERY_TEACHER_ENDPOINT names one."""
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
               *, sse_block_ms: int = 1000, sse_heartbeat_s: float = 15.0,
               ray_cluster: Callable[[], Cluster | None] | None = None) -> FastAPI:
    """The API over `store` (default: Redis at settings.redis_url). `ray_ping` answers /readyz's
    Ray half and `ray_cluster` the cluster's resources for the submit-time fit check (default:
    the Ray dashboard at settings.ray_address)."""
    check_exposure(settings)
    owned = store is None
    store = store or JobStore(settings.redis_url, settings.redis_prefix, settings.events_max)
    service = JobService(settings, store, ray_ping or http_ray_ping(settings.ray_address), block_ms=sse_block_ms,
                         cluster=ray_cluster)

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
