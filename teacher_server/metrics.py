"""Prometheus metrics of one teacher server (own registry, so several servers fit one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_JOB_LABELS = 256  # distinct jobs with series of their own; later ones share the label "other"
UNNAMED_JOB = "-"  # the label of requests whose client named no job


class _JobLabels:
    """One job's view of a per-job metric: `labels(kind)` fills the job label in."""

    def __init__(self, metric, job: str) -> None:
        self.metric, self.job = metric, job

    def labels(self, kind: str):
        return self.metric.labels(self.job, kind)


class JobMetrics:
    """The per-job series of one job: requests, tokens, queue wait (by kind), batch share, refusals."""

    def __init__(self, m: "TeacherMetrics", job: str) -> None:
        self.requests = _JobLabels(m.job_requests, job)
        self.tokens = _JobLabels(m.job_tokens, job)
        self.queue_wait = _JobLabels(m.job_queue_wait, job)
        self.batch_share = m.job_batch_share.labels(job)
        self.rejected = m.job_rejected.labels(job)


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

        # Per job (the `x-distillery-job` metadata of each call): what the fair queue gives each.
        self.job_requests = Counter("distillery_teacher_job_requests_total",
                                    "Requests accepted into the queue, per job", ["job", "kind"],
                                    registry=r)
        self.job_tokens = Counter("distillery_teacher_job_tokens_total",
                                  "Tokens processed per job: scored (score), generated (generate)",
                                  ["job", "kind"], registry=r)
        self.job_queue_wait = Histogram("distillery_teacher_job_queue_wait_seconds",
                                        "From a request's arrival to its first engine work, per job",
                                        ["job", "kind"],
                                        buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                        registry=r)
        self.job_batch_share = Histogram("distillery_teacher_job_batch_share",
                                         "A job's share of the tokens of each Score step it was in",
                                         ["job"], buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.job_rejected = Counter("distillery_teacher_job_rejected_total",
                                    "Requests of a job refused (its queue limit or the whole queue)",
                                    ["job"], registry=r)
        self._jobs: dict[str, JobMetrics] = {}

    def job(self, job: str) -> JobMetrics:
        """The series of `job`; past MAX_JOB_LABELS distinct jobs, new ones share "other"."""
        name = job or UNNAMED_JOB
        view = self._jobs.get(name)
        if view is None:
            if len(self._jobs) >= MAX_JOB_LABELS:
                name = "other"
                view = self._jobs.get(name)
            if view is None:
                view = self._jobs[name] = JobMetrics(self, name)
        return view

    def observe_batch(self, kind: str, requests: int, tokens: int, seconds: float) -> None:
        self.batch_requests.labels(kind).observe(requests)
        self.batch_tokens.labels(kind).observe(tokens)
        self.tokens.labels(kind).inc(tokens)
        self.batch_seconds.labels(kind).observe(seconds)
