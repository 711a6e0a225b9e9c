"""Prometheus metrics of one teacher server (own registry, so several servers fit one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TeacherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("distillery_teacher_queue_depth", "Requests waiting for a batch",
                                 registry=r)
        self.rejected = Counter("distillery_teacher_rejected_total",
                                "Requests refused because the queue was full", registry=r)
        self.cancelled = Counter("distillery_teacher_cancelled_total",
                                 "Requests dropped because their caller cancelled or timed out",
                                 registry=r)
        self.batch_requests = Histogram("distillery_teacher_batch_requests",
                                        "Requests merged into one engine call", ["kind"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_tokens = Histogram("distillery_teacher_batch_tokens",
                                      "Tokens of one engine call (generate: tokens generated)", ["kind"],
                                      buckets=(64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.tokens = Counter("distillery_teacher_tokens_total",
                              "Tokens processed: sequence tokens scored (score), tokens generated "
                              "(generate); rate() of this is tokens/s", ["kind"], registry=r)
        self.queue_wait = Histogram("distillery_teacher_queue_wait_seconds",
                                    "From a request's arrival to its first engine work", ["kind"],
                                    buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                    registry=r)
        self.time_to_first_token = Histogram(
            "distillery_teacher_time_to_first_token_seconds",
            "Generate: from a request's arrival to its first generated token",
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.batch_seconds = Histogram("distillery_teacher_batch_seconds",
                                       "Wall time of one engine call", ["kind"], registry=r)
        self.request_seconds = Histogram("distillery_teacher_request_seconds",
                                         "Latency of one RPC as the server saw it", ["method", "code"],
                                         registry=r)

    def observe_batch(self, kind: str, requests: int, tokens: int, seconds: float) -> None:
        self.batch_requests.labels(kind).observe(requests)
        self.batch_tokens.labels(kind).observe(tokens)
        self.tokens.labels(kind).inc(tokens)
        self.batch_seconds.labels(kind).observe(seconds)
