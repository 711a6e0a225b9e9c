"""Ray as the services see it, over HTTP: the Jobs API (submit, status, stop, logs), a liveness
probe, and the cluster's resources for admission. Nothing here needs a Ray driver connection, so
the API and the scheduler start (and answer) while Ray comes up."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Callable

# The driver only waits on its workers. Any reservation would make a job that asks for every CPU of
# the cluster unschedulable (its workers' placement group waits on the driver's share forever).
ENTRYPOINT_CPUS = 0


class RayJobs:
    """The part of the Ray Jobs API the scheduler uses. A job Ray does not know is None, not an
    error; an unreachable dashboard raises OSError; a refusal raises RuntimeError. The client
    connects on first use, so a scheduler starts (and keeps its leases) while Ray comes up."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = None
        self._cluster = http_ray_cluster(address)

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, submission_id: str, entrypoint: str, *, metadata: dict[str, str],
               env_vars: dict[str, str]) -> None:
        # No working_dir: the cluster has the distillery package installed.
        self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
                               runtime_env={"env_vars": env_vars}, entrypoint_num_cpus=ENTRYPOINT_CPUS)

    def status(self, submission_id: str) -> tuple[str, str] | None:
        """(status, message), e.g. ("FAILED", "Job entrypoint command failed ..."); None if unknown."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as exc:
            if _not_found(exc):
                return None
            raise
        return str(getattr(info.status, "value", info.status)), info.message or ""

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL); False if it was not running."""
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError as exc:
            if _not_found(exc):
                return False
            raise

    def cluster(self) -> Cluster | None:
        """The alive nodes' resources; None when the dashboard does not answer."""
        return self._cluster()

    def logs(self, submission_id: str) -> str:
        try:
            return self.client.get_job_logs(submission_id)
        except RuntimeError as exc:
            if _not_found(exc):
                return ""
            raise


def _not_found(exc: RuntimeError) -> bool:
    return "status code 404" in str(exc)


# ---------------------------------------------------------------------- plain HTTP
def ray_auth_headers() -> dict[str, str]:
    """The headers Ray's own clients send when the cluster has token authentication on (the
    default since Ray 2.5x); empty when it is off or Ray cannot tell."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # an older Ray without token auth
        return {}
    try:
        return dict(get_auth_headers_if_auth_enabled({}))
    except Exception:  # noqa: BLE001 - no token to be had: the request goes without one
        return {}


def http_ray_ping(address: str, timeout_s: float = 2.0) -> Callable[[], bool]:
    """Ray is reachable when its dashboard (the Jobs API the scheduler uses) answers."""
    url = address.rstrip("/") + "/api/version"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def ping() -> bool:
        try:
            request = urllib.request.Request(url, headers=ray_auth_headers())
            with opener.open(request, timeout=timeout_s) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

    return ping


@dataclass(frozen=True)
class Cluster:
    """What the cluster has in all (alive nodes): totals and the largest node, per resource
    (CPU, GPU, memory in bytes, ...)."""

    total: dict[str, float]
    largest_node: dict[str, float]
    nodes: int


def http_ray_cluster(address: str, timeout_s: float = 3.0) -> Callable[[], Cluster | None]:
    """Reads the alive nodes' resources from the dashboard's state API; None when Ray does not
    answer (admission then waits, and the API accepts the job without the fit check)."""
    url = address.rstrip("/") + "/api/v0/nodes?limit=10000&detail=false"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def read() -> Cluster | None:
        try:
            request = urllib.request.Request(url, headers=ray_auth_headers())
            with opener.open(request, timeout=timeout_s) as resp:
                body = json.loads(resp.read())
            rows = body["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cluster_of([row.get("resources_total") or {} for row in rows if row.get("state") == "ALIVE"])

    return read


def cluster_of(nodes: list[dict[str, float]]) -> Cluster:
    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            if isinstance(amount, (int, float)) and not name.startswith("node:"):
                total[name] = total.get(name, 0.0) + float(amount)
                largest[name] = max(largest.get(name, 0.0), float(amount))
    return Cluster(total, largest, len(nodes))
