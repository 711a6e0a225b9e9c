"""Service settings, read once from the environment (the names deploy files set).

| variable | default | meaning |
|---|---|---|
| REDIS_URL | redis://127.0.0.1:6379/0 | job state, queue, events |
| DISTILLERY_REDIS_PREFIX | distillery | prefix of every Redis key |
| DISTILLERY_API_HOST | 127.0.0.1 | API bind address; anything but loopback requires API keys |
| DISTILLERY_API_PORT | 8000 | API port |
| DISTILLERY_API_KEYS | (none) | comma-separated bearer keys accepted by the API |
| DISTILLERY_MODEL_ROOTS | (none) | comma-separated directories model paths must resolve inside |
| DISTILLERY_DATA_ROOTS | (none) | comma-separated directories data paths must resolve inside |
| DISTILLERY_ALLOW_DOWNLOADS | 0 | 1: a hub id missing from the hub cache is accepted and the job's workers download it; 0: refused at submit (also passed to the Ray jobs) |
| HF_HUB_CACHE, HF_HOME | ~/.cache/huggingface/hub | the hub cache hub ids resolve through; it must lie inside a model root |
| DISTILLERY_ALLOWED_SCORERS | (none) | comma-separated module prefixes an `eval.scorer` may name (it runs in the workers); none: refused |
| DISTILLERY_RUNS_DIR | runs | where each job's run directory (checkpoints, events) is created |
| DISTILLERY_RAY_ADDRESS | http://127.0.0.1:8265 | Ray dashboard / Jobs API the scheduler submits to |
| DISTILLERY_TEACHER_ENDPOINT | (none) | a teacher (host:port) the API's /readyz requires SERVING; `distillery up --teacher-model` sets it |
| DISTILLERY_MAX_BODY_BYTES | 1000000 | largest request body the API reads |
| DISTILLERY_LEASE_S | 30 | lease of a running job; a scheduler renews it every third of that |
| DISTILLERY_SCHEDULER_ID | host-pid | this scheduler's name in leases |
| DISTILLERY_EVENTS_MAX | 10000 | events kept per job (older ones are trimmed) |
| DISTILLERY_MAX_RUNNING_JOBS | 0 | most jobs running at once (0 = as many as the cluster's resources hold) |
| DISTILLERY_CLUSTER_AUTOSCALES | 0 | 1: a job larger than the cluster waits queued (for nodes) instead of a 422 |
| DISTILLERY_API_URL | http://127.0.0.1:8000 | where the CLI finds the API |
| DISTILLERY_API_KEY | (none) | the key the CLI sends |
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Mapping

from teacher_server.model_dirs import downloads_allowed, hub_cache_dir

ENV_NAMES = (
    "REDIS_URL", "DISTILLERY_REDIS_PREFIX", "DISTILLERY_API_HOST", "DISTILLERY_API_PORT",
    "DISTILLERY_API_KEYS", "DISTILLERY_MODEL_ROOTS", "DISTILLERY_DATA_ROOTS", "DISTILLERY_RUNS_DIR",
    "DISTILLERY_RAY_ADDRESS", "DISTILLERY_TEACHER_ENDPOINT", "DISTILLERY_MAX_BODY_BYTES", "DISTILLERY_LEASE_S",
    "DISTILLERY_SCHEDULER_ID", "DISTILLERY_EVENTS_MAX", "DISTILLERY_API_URL", "DISTILLERY_API_KEY",
    "DISTILLERY_MAX_RUNNING_JOBS", "DISTILLERY_CLUSTER_AUTOSCALES", "DISTILLERY_ALLOW_DOWNLOADS", "DISTILLERY_ALLOWED_SCORERS",
)


class SettingsError(ValueError):
    """An environment variable holds something its setting cannot take (the CLI prints it as one line)."""


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _number(env: Mapping[str, str], name: str, default: int | float) -> int | float:
    raw = env.get(name)
    if raw is None:
        return default
    kind = type(default)
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "distillery"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keys: tuple[str, ...] = ()
    model_roots: tuple[str, ...] = ()
    data_roots: tuple[str, ...] = ()
    allow_downloads: bool = False
    hub_cache: str = field(default_factory=lambda: str(hub_cache_dir()))
    allowed_scorers: tuple[str, ...] = ()
    runs_dir: str = "runs"
    ray_address: str = "http://127.0.0.1:8265"
    teacher_endpoint: str | None = None
    max_body_bytes: int = 1_000_000
    lease_s: float = 30.0
    scheduler_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    events_max: int = 10_000
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    max_running_jobs: int = 0
    cluster_autoscales: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """The settings the environment gives; SettingsError names a variable that holds a bad value."""
        e = os.environ if env is None else env
        d = cls()
        return cls(
            redis_url=e.get("REDIS_URL", d.redis_url),
            redis_prefix=e.get("DISTILLERY_REDIS_PREFIX", d.redis_prefix),
            api_host=e.get("DISTILLERY_API_HOST", d.api_host),
            api_port=_number(e, "DISTILLERY_API_PORT", d.api_port),
            api_keys=_list(e.get("DISTILLERY_API_KEYS")),
            model_roots=_list(e.get("DISTILLERY_MODEL_ROOTS")),
            data_roots=_list(e.get("DISTILLERY_DATA_ROOTS")),
            allow_downloads=downloads_allowed(e),
            hub_cache=str(hub_cache_dir(e)),
            allowed_scorers=_list(e.get("DISTILLERY_ALLOWED_SCORERS")),
            runs_dir=e.get("DISTILLERY_RUNS_DIR", d.runs_dir),
            ray_address=e.get("DISTILLERY_RAY_ADDRESS", d.ray_address),
            teacher_endpoint=e.get("DISTILLERY_TEACHER_ENDPOINT") or None,
            max_body_bytes=_number(e, "DISTILLERY_MAX_BODY_BYTES", d.max_body_bytes),
            lease_s=_number(e, "DISTILLERY_LEASE_S", d.lease_s),
            scheduler_id=e.get("DISTILLERY_SCHEDULER_ID") or d.scheduler_id,
            events_max=_number(e, "DISTILLERY_EVENTS_MAX", d.events_max),
            api_url=e.get("DISTILLERY_API_URL", d.api_url),
            api_key=e.get("DISTILLERY_API_KEY") or None,
            max_running_jobs=_number(e, "DISTILLERY_MAX_RUNNING_JOBS", d.max_running_jobs),
            cluster_autoscales=e.get("DISTILLERY_CLUSTER_AUTOSCALES", "0").strip().lower() in ("1", "true", "yes"),
        )

    @property
    def exposed(self) -> bool:
        """True when the API listens on anything but loopback (then keys are mandatory)."""
        return self.api_host not in ("127.0.0.1", "localhost", "::1")
