"""TeacherClient: the teacher contract over gRPC, returning torch tensors.

    client = TeacherClient(["127.0.0.1:50051", "127.0.0.1:50052"], timeout_s=60)
    scored = client.score([ids], [len(prompt)], top_k=16)

- Every call has a deadline (`timeout_s` for the whole call, retries of a full queue included).
- UNAVAILABLE (server down, restarting, loading or draining) is retried with exponential backoff
  and jitter, moving to the next endpoint each time, for `unavailable_timeout_s` from the call's
  first failed attempt (default: `timeout_s`); then `TeacherUnavailable("teacher unavailable at
  <endpoints> since <UTC time of that attempt> ...")` with the last status. A teacher back in time
  answers the call, with a whole `timeout_s` again (R-14). `on_unavailable(message)` hears once
  per call that it has begun to wait (workers turn it into a `teacher_wait` event).
- Endpoints are used round-robin, one call each. A `dns:///name:port` target (a Kubernetes
  headless Service) gets gRPC's own round_robin policy over its addresses.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Sequence

import grpc

from . import wire
from .contract import (
    JOB_KEY,
    JOB_WEIGHT_KEY,
    RETRYABLE_KEY,
    Generation,
    InvalidRequest,
    Overloaded,
    SamplingParams,
    ScoreArgs,
    ScoredSequence,
    TeacherError,
    TeacherInfo,
    TeacherUnavailable,
    TokenSeq,
    as_ids,
)
from .pb import teacher_pb2 as pb
from .pb import teacher_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def _overloaded(err: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED means a full queue (worth retrying) or an over-sized message (never)."""
    if any(k == RETRYABLE_KEY for k, _ in (err.trailing_metadata() or ())):
        return True
    # gRPC's own refusal past the server's concurrent-RPC limit carries no marker of ours.
    return "Concurrent RPC limit exceeded" in (err.details() or "")


def _raise_for(err: grpc.RpcError, endpoint: str) -> None:
    code, detail = err.code(), err.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise InvalidRequest(detail) from None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if _overloaded(err):
            raise Overloaded(f"{endpoint}: {detail}") from None
        raise InvalidRequest(f"request refused by {endpoint} as too large: {detail}") from None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise TeacherUnavailable(f"teacher at {endpoint}: {code.name}: {detail}") from None
    raise TeacherError(f"teacher at {endpoint}: {code.name}: {detail}") from None


class TeacherClient:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout_s: float = 120.0,
        unavailable_timeout_s: float | None = None,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        retry_overloaded: bool = True,
        token: str | None = None,
        max_message_mb: int = 256,
        on_unavailable: Callable[[str], None] | None = None,
        job_id: str | None = None,
        job_weight: float | None = None,
    ) -> None:
        """`job_id` / `job_weight` name the job every call is for and the share it asks: a
        server that many jobs share queues them fairly by job (its own weights win)."""
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("TeacherClient needs at least one endpoint")
        self.timeout_s = timeout_s
        self.unavailable_timeout_s = timeout_s if unavailable_timeout_s is None else unavailable_timeout_s
        self.on_unavailable = on_unavailable
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retry_overloaded = retry_overloaded
        meta = [("authorization", f"Bearer {token}")] if token else []
        if job_id:
            meta.append((JOB_KEY, job_id))
        if job_weight is not None:
            meta.append((JOB_WEIGHT_KEY, repr(float(job_weight))))
        self._metadata = tuple(meta)
        size = max_message_mb * 1024 * 1024
        # gRPC's own reconnect backoff grows to 120 s while a server is down: a teacher back after
        # a long outage would go unseen for minutes, so it is capped by ours.
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                   ("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 0),
                   ("grpc.max_reconnect_backoff_ms", max(100, int(max_backoff_s * 1000)))]
        self._channels = [grpc.insecure_channel(e, options=options) for e in self.endpoints]
        self._stubs = [pb_grpc.TeacherStub(c) for c in self._channels]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.last_latency_s = 0.0
        self._info: TeacherInfo | None = None

    # ------------------------------------------------------------------ calls
    def info(self) -> TeacherInfo:
        self._info = wire.info_from_pb(self._call(lambda s: s.Info, pb.InfoRequest()))
        return self._info

    def score(self, sequences: Sequence[TokenSeq], score_from: Sequence[int], *, top_k: int,
              temperature: float = 1.0, full_logprobs: bool = False,
              candidates: Sequence[torch.Tensor] | None = None) -> list[ScoredSequence]:
        args = ScoreArgs([as_ids(s) for s in sequences], list(score_from), top_k, temperature,
                         full_logprobs, list(candidates) if candidates is not None else None)
        reply = self._call(lambda s: s.Score, wire.score_request_to_pb(args))
        return [wire.scored_from_pb(m) for m in reply.sequences]

    def generate(self, prompts: Sequence[TokenSeq], params: SamplingParams) -> list[Generation]:
        msg = wire.generate_request_to_pb([as_ids(p) for p in prompts], params)
        reply = self._call(lambda s: s.Generate, msg)
        return [wire.generation_from_pb(g) for g in reply.generations]

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ retries
    def _call(self, method: Callable[[pb_grpc.TeacherStub], Callable], request):
        start = time.monotonic()
        deadline = start + self.timeout_s
        failed_at: tuple[float, datetime] | None = None  # the first failed attempt: monotonic, UTC
        attempt, waiting = 0, False
        while True:
            with self._lock:
                i = next(self._next) % len(self._stubs)
            began = (time.monotonic(), datetime.now(timezone.utc))
            try:
                reply = method(self._stubs[i])(request, timeout=max(deadline - began[0], 0.001),
                                               metadata=self._metadata)
                self.last_latency_s = time.monotonic() - start
                if waiting:
                    log.info("teacher at %s answered again after %.1f s", self.endpoints[i],
                             time.monotonic() - failed_at[0])
                return reply
            except grpc.RpcError as err:
                code = err.code()
                failed_at = failed_at or began
                attempt += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2**(attempt - 1)) * (0.5 + random.random())
                if code == grpc.StatusCode.UNAVAILABLE:
                    left = failed_at[0] + self.unavailable_timeout_s - time.monotonic()
                    if left <= 0:
                        raise TeacherUnavailable(self._unavailable(failed_at, attempt, err)) from None
                    if not waiting:
                        self._waiting(failed_at[1], err)
                        waiting = True
                    time.sleep(min(delay, left))
                    deadline = time.monotonic() + self.timeout_s  # a teacher back gets the whole deadline
                    continue
                overloaded = self.retry_overloaded and code == grpc.StatusCode.RESOURCE_EXHAUSTED \
                    and _overloaded(err)
                if overloaded and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    continue
                if overloaded or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TeacherUnavailable(self._unavailable(failed_at, attempt, err)) from None
                _raise_for(err, self.endpoints[i])

    def _unavailable(self, failed_at: tuple[float, datetime], attempts: int, err: grpc.RpcError) -> str:
        waited = time.monotonic() - failed_at[0]
        return (f"teacher unavailable at {', '.join(self.endpoints)} since {_utc(failed_at[1])}: no answer "
                f"after {attempts} attempt(s) in {waited:.1f}s (last: {err.code().name}: {err.details()})")

    def _waiting(self, since: datetime, err: grpc.RpcError) -> None:
        message = (f"teacher unavailable at {', '.join(self.endpoints)} since {_utc(since)} "
                   f"({err.code().name}: {err.details()}); retrying for up to "
                   f"{self.unavailable_timeout_s:.0f}s")
        log.warning("%s", message)
        if self.on_unavailable is not None:
            self.on_unavailable(message)


def _utc(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def wait_until_serving(endpoint: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Poll grpc.health.v1 until `endpoint` reports SERVING; raise TeacherUnavailable on timeout."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = err.code().name
            time.sleep(0.1)
    raise TeacherUnavailable(f"teacher at {endpoint} not SERVING after {timeout_s:.0f}s (last: {last})")
