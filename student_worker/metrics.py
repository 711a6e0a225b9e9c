"""Per-step metrics as Ray metrics, so they show in the Ray dashboard and its Prometheus export."""

from __future__ import annotations

from typing import Any

# (metric name, step-metrics key, description)
_GAUGES = [
    ("distillery_loss", "loss", "Training loss of the last step"),
    ("distillery_tokens_per_second", "tokens_per_s", "Response tokens per second of the last step"),
    ("distillery_teacher_latency_seconds", "teacher_latency_s", "Teacher score latency of the last step"),
    ("distillery_step_seconds", "step_s", "Wall time of the last optimizer step"),
    ("distillery_teacher_logprob", "teacher_logprob", "Mean teacher log-prob of the response tokens"),
]


class RayMetrics:
    def __init__(self, job_id: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tags = {"job_id": job_id}
        keys = ("job_id", "stage")
        self.gauges = [(Gauge(name, description=desc, tag_keys=keys), key) for name, key, desc in _GAUGES]
        self.steps = Counter("distillery_steps_total", description="Optimizer steps taken", tag_keys=keys)

    def record(self, m: dict[str, Any]) -> None:
        tags = {**self.tags, "stage": str(m.get("stage", ""))}
        for gauge, key in self.gauges:
            value = m.get(key)
            if isinstance(value, (int, float)):
                gauge.set(float(value), tags=tags)
        if "loss" in m:
            self.steps.inc(1.0, tags=tags)
