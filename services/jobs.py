"""The job service layer: parse and check a submitted spec (strict JSON, no trust_remote_code,
paths inside the configured roots), then create, read and cancel jobs through the store."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from services.admission import never_fits
from services.rayapi import Cluster, http_ray_cluster
from services.settings import Settings
from services.store import TERMINAL, Job, JobStore, TransitionRefused
from student_worker.config import LOAD_DATASET_BUILDERS, JobSpec
from teacher_server.health import serving
from teacher_server.model_dirs import ModelNotCached, is_hub_id, resolve_model

from services.protocol import (
    _clean_errors,
    AlreadyEnded,
    InvalidSpec,
    MAX_PATH_BYTES,
    NeverFits,
    NotResumable,
    PathRefused,
    Readiness,
    TOKEN_ENV,
    UnsafeSpec,
)

log = logging.getLogger(__name__)

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


def check_tracking_uri(uri: str) -> None:
    """An MLflow tracking URI from a request names a server, never a store on the workers' disks
    or a database, and carries no credentials: those come from the workers' environment."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https", "databricks") or "@" in parts.netloc or parts.query:
        raise UnsafeSpec("tracking.mlflow.tracking_uri from a request must be an http(s) MLflow server (or "
                         "databricks) with no credentials in it; leave it null to use the workers' "
                         "MLFLOW_TRACKING_URI, which the operator sets with any credentials")


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


def scorer_allowed(scorer: str, prefixes: tuple[str, ...]) -> bool:
    """An eval.scorer ("module:function") whose module is one of `prefixes` or inside one."""
    module = scorer.partition(":")[0]
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------- service
class JobService:
    """Validates and orchestrates; returns typed results or raises the errors above."""

    def __init__(self, settings: Settings, store: JobStore, ray_ping: Callable[[], bool],
                 block_ms: int = 1000, cluster: Callable[[], Cluster | None] | None = None) -> None:
        self.store, self.ray_ping, self.block_ms = store, ray_ping, block_ms
        # A job larger than the cluster is refused at submit, unless the cluster grows on demand.
        self.cluster = None if settings.cluster_autoscales else (cluster or http_ray_cluster(settings.ray_address))
        self.models = PathPolicy(settings.model_roots, "DISTILLERY_MODEL_ROOTS", "model")
        self.data = PathPolicy(settings.data_roots, "DISTILLERY_DATA_ROOTS", "data")
        self.runs = PathPolicy((settings.runs_dir,), "DISTILLERY_RUNS_DIR", "run")
        self.teacher_endpoint = settings.teacher_endpoint
        self.hub_cache, self.allow_downloads = settings.hub_cache, settings.allow_downloads
        self.allowed_scorers = settings.allowed_scorers

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
        s.model, s.revision = self.model_ref("student", "model", s.model, s.revision)
        if t.local_model is not None:
            t.local_model, t.revision = self.model_ref("teacher", "local_model", t.local_model, t.revision)
        if t.ray_actor is not None:
            a = t.ray_actor
            a.model, a.revision = self.model_ref("teacher.ray_actor", "model", a.model, a.revision)
        if t.chat_template is not None:
            t.chat_template = self.models.resolve("teacher.chat_template", t.chat_template)
        if not (d.path in LOAD_DATASET_BUILDERS and d.format in ("auto", "load_dataset")):  # else a builder name
            d.path = self.data.resolve("data.path", d.path)
        if d.eval_path is not None:
            d.eval_path = self.data.resolve("data.eval_path", d.eval_path)
        if d.data_files is not None:
            d.data_files = {split: [self.data.resolve(f"data.data_files.{split}", f) for f in files]
                            for split, files in d.data_files.items()}
        if spec.eval.scorer is not None and not scorer_allowed(spec.eval.scorer, self.allowed_scorers):
            raise UnsafeSpec(f"eval.scorer {spec.eval.scorer} is code the workers would run; this service runs only "
                             f"scorers in the modules its operator allows (DISTILLERY_ALLOWED_SCORERS: "
                             f"{', '.join(self.allowed_scorers) or 'none'})")
        spec.checkpoint.dir = self.runs.resolve("checkpoint.dir", spec.checkpoint.dir)
        if res.storage_path is not None:
            if "://" in res.storage_path:
                raise PathRefused("resources.storage_path: storage URIs cannot come from a request")
            res.storage_path = self.runs.resolve("resources.storage_path", res.storage_path)
        if spec.tracking.mlflow is not None and spec.tracking.mlflow.tracking_uri is not None:
            check_tracking_uri(spec.tracking.mlflow.tracking_uri)
        if t.token_env is not None and not TOKEN_ENV.match(t.token_env):
            raise UnsafeSpec("teacher.token_env must name a variable starting with DISTILLERY_TEACHER_TOKEN "
                             "(its value is sent to the teacher endpoints)")
        return spec

    def model_ref(self, section: str, name: str, raw: str, revision: str | None) -> tuple[str, str | None]:
        """A model reference from a request, and its revision: a path inside the model roots
        (resolved), or a hub id (kept) when the hub cache lies inside them. A hub id the cache
        holds is pinned to the commit it holds, so every attempt of the job trains the same
        weights; one it lacks is accepted only when downloads are allowed."""
        field = f"{section}.{name}"
        local = self.models.resolve(field, raw)  # refused untouched when outside; relative: in the first root
        if not is_hub_id(raw) or os.path.isdir(local):
            if revision is not None:
                raise InvalidSpec(f"{section}.revision applies to hub ids (org/name); {field} {raw[:200]!r} "
                                  "is a path")
            return local, None
        try:
            self.models.resolve(field, self.hub_cache)
        except PathRefused:
            raise PathRefused(f"{field} {raw!r} is a hub id, found through the hub cache {self.hub_cache}, which is "
                              f"outside the model roots: the operator puts the cache inside one (HF_HUB_CACHE or "
                              f"HF_HOME) or adds it to DISTILLERY_MODEL_ROOTS") from None
        try:
            found = resolve_model(raw, revision, allow_downloads=False, cache_dir=self.hub_cache)
        except ModelNotCached as exc:
            if self.allow_downloads:
                return raw, revision
            raise PathRefused(f"{field}: {exc}") from None
        self.models.resolve(field, str(found.path))  # a snapshot linked out of the roots is refused
        return raw, found.commit

    def submit(self, raw: bytes, idempotency_key: str | None) -> tuple[Job, bool]:
        spec = self.accept(raw)
        self.check_fits(spec)
        doc = spec.model_dump(mode="json")
        job_id, created = self.store.create(doc, name=doc["name"], idempotency_key=idempotency_key)
        job = self.store.get(job_id)
        if not created and job.spec != doc:
            raise InvalidSpec("this Idempotency-Key was used for a different job spec")
        return job, created

    def check_fits(self, spec: JobSpec) -> None:
        """422 for a job that could never start on this cluster (with the numbers). When Ray does
        not answer the job is accepted: the scheduler admits it once Ray tells what is free."""
        cluster = self.cluster() if self.cluster is not None else None
        if cluster is not None and (why := never_fits(spec, cluster)) is not None:
            raise NeverFits(f"{why}: it could never start. Ask for fewer or smaller workers "
                            "(resources.workers, cpus_per_worker, gpus_per_worker, memory_gb_per_worker)")

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def resume(self, job_id: str) -> Job:
        """A failed or cancelled job back to the queue; its next attempt carries on from the last
        checkpoint in its run directory."""
        try:
            self.store.resume(job_id)
        except TransitionRefused as exc:
            raise NotResumable(str(exc)) from None
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
        teacher_ok = serving(self.teacher_endpoint) if self.teacher_endpoint else None
        ready = redis_ok and ray_ok and teacher_ok is not False
        return Readiness(status="ready" if ready else "not_ready", redis=redis_ok, ray=ray_ok, teacher=teacher_ok)

    def count_by_state(self) -> dict[str, int]:
        return self.store.count_by_state()
