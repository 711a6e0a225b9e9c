"""gRPC transport for the teacher: decode, validate, hand to the batcher, encode, map errors.

Every domain error becomes a gRPC status in one place (`_status_for`); nothing else in the server
chooses status codes. Until the engine is loaded, and while draining, calls get UNAVAILABLE so a
client with retries moves on to another replica.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import threading
import time
from typing import Callable

import grpc

from . import wire
from .batcher import Batcher
from .contract import (
    JOB_KEY,
    JOB_WEIGHT_KEY,
    MAX_JOB_ID_CHARS,
    MAX_JOB_WEIGHT,
    MIN_JOB_WEIGHT,
    RETRYABLE_KEY,
    Cancelled,
    InvalidRequest,
    Limits,
    Overloaded,
    TeacherUnavailable,
    validate_generate,
    validate_score,
)
from .engine import TeacherEngine
from .metrics import TeacherMetrics
from .pb import teacher_pb2 as pb
from .pb import teacher_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# grpcio reports a call without a deadline as one with an enormous time remaining (years), which
# no wait accepts (OverflowError); past this many seconds a call counts as having no deadline.
NO_DEADLINE_S = 365 * 24 * 3600.0


def remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline; None when the client set none (no limit, then)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else max(left, 0.0)


class NotReady(Exception):
    """The engine is still loading, or the server is draining."""


def _status_for(exc: BaseException, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (NotReady, TeacherUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Cancelled):
        remaining = remaining_s(context)
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        return grpc.StatusCode.CANCELLED, str(exc)
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _rpc(method: Callable) -> Callable:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: "TeacherServicer", request, context: grpc.ServicerContext):
        start, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never a crash
            code, detail = _status_for(exc, context)
            if isinstance(exc, (Overloaded, NotReady, TeacherUnavailable)):
                context.set_trailing_metadata(((RETRYABLE_KEY, "1"),))
            context.abort(code, detail)
        finally:
            self.metrics.request_seconds.labels(name, code.name).observe(time.monotonic() - start)

    return wrapper


class TeacherServicer(pb_grpc.TeacherServicer):
    def __init__(self, metrics: TeacherMetrics, max_reply_bytes: int | None = None) -> None:
        self.metrics = metrics
        self.max_reply_bytes = max_reply_bytes  # the server's send cap: larger replies are refused
        self.engine: TeacherEngine | None = None
        self.batcher: Batcher | None = None
        self.draining = False

    def attach(self, engine: TeacherEngine, batcher: Batcher | None) -> None:
        """`batcher` None: the engine batches by itself (vLLM's continuous batching) and takes
        calls straight from the RPC threads, bounding them with its own queue limit."""
        self.engine, self.batcher = engine, batcher

    def _ready(self) -> tuple[TeacherEngine, Batcher | None]:
        if self.draining:
            raise NotReady("teacher is draining; retry on another replica")
        if self.engine is None:
            raise NotReady("teacher model is still loading")
        return self.engine, self.batcher

    def _direct(self, context: grpc.ServicerContext, call: Callable) -> list:
        """Run `call(cancelled)` on this RPC thread, for an engine without our batcher; a row the
        engine gave up on (caller gone or deadline passed) makes the call Cancelled."""
        gone = threading.Event()
        context.add_callback(gone.set)
        deadline = self._deadline(context)

        def cancelled(_row: int) -> bool:
            return gone.is_set() or (deadline is not None and time.monotonic() > deadline)

        results = call(cancelled)
        if any(r is None for r in results):
            raise Cancelled("cancelled while the engine worked on it")
        return results

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float | None:
        remaining = remaining_s(context)
        return None if remaining is None else time.monotonic() + remaining

    def limits(self, engine: TeacherEngine) -> Limits:
        """The engine's limits under this server's message cap: full rows are allowed only for as
        many positions as fit one reply, so Info never promises what a reply could not carry."""
        limits = engine.limits
        if self.max_reply_bytes is None:
            return limits
        fit = max(0, (self.max_reply_bytes - 4096) // (4 * limits.vocab_size + 1064))
        return dataclasses.replace(limits, max_reply_bytes=self.max_reply_bytes,
                                   max_full_row_positions=min(limits.max_full_row_positions, fit))

    @_rpc
    def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        engine, _ = self._ready()
        info = dataclasses.replace(
            engine.info(), max_full_row_positions=self.limits(engine).max_full_row_positions)
        return wire.info_to_pb(info)

    @_rpc
    def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        engine, batcher = self._ready()
        args = wire.score_request_from_pb(request)
        validate_score(args, self.limits(engine))
        if batcher is None:
            results = self._direct(context, lambda cancelled: engine.score(args, cancelled=cancelled))
        else:
            job, weight = job_of(context)
            ticket = batcher.submit_score(args, self._deadline(context), job=job, weight=weight)
            context.add_callback(ticket.cancel)
            results = ticket.result(remaining_s(context))
        return pb.ScoreResponse(sequences=[wire.scored_to_pb(r) for r in results])

    @_rpc
    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        engine, batcher = self._ready()
        prompts, params = wire.generate_request_from_pb(request)
        validate_generate(prompts, params, self.limits(engine))
        if batcher is None:
            results = self._direct(context, lambda cancelled: engine.generate(prompts, params,
                                                                              cancelled=cancelled))
        else:
            job, weight = job_of(context)
            ticket = batcher.submit_generate(prompts, params, self._deadline(context), job=job,
                                             weight=weight)
            context.add_callback(ticket.cancel)
            results = ticket.result(remaining_s(context))
        return pb.GenerateResponse(generations=[wire.generation_to_pb(g) for g in results])


def job_of(context: grpc.ServicerContext) -> tuple[str, float | None]:
    """The job a call is for and the weight its client asks (JOB_KEY / JOB_WEIGHT_KEY metadata);
    ("", None) when it names none. A malformed value is the caller's error."""
    meta = dict(context.invocation_metadata() or ())
    job = meta.get(JOB_KEY, "")
    if len(job) > MAX_JOB_ID_CHARS or not all(33 <= ord(c) < 127 for c in job):
        raise InvalidRequest(f"{JOB_KEY} must be at most {MAX_JOB_ID_CHARS} printable ASCII "
                             f"characters without spaces, got {job[:40]!r}")
    raw = meta.get(JOB_WEIGHT_KEY)
    if raw is None:
        return job, None
    try:
        weight = float(raw)
    except ValueError:
        weight = float("nan")
    if not MIN_JOB_WEIGHT <= weight <= MAX_JOB_WEIGHT:
        raise InvalidRequest(f"{JOB_WEIGHT_KEY} must be a number in [{MIN_JOB_WEIGHT}, "
                             f"{MAX_JOB_WEIGHT}], got {raw!r}")
    return job, weight


class BearerAuth(grpc.ServerInterceptor):
    """Require `authorization: Bearer <token>` on teacher calls; health and reflection stay open."""

    _OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self._OPEN):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny
