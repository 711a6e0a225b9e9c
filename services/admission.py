"""Admission control: a job starts only when the cluster can hold it.

A job's demand is what Ray reserves for it: workers x (CPU, GPU, memory) and, when the spec starts
its teacher inside Ray, replicas x (CPU, GPU). The scheduler admits the oldest queued job (FIFO: a
job that waits holds back the ones queued after it, so a large job is never starved by small ones)
when
  - fewer than DISTILLERY_MAX_RUNNING_JOBS jobs are active (0 = no cap), and
  - its demand fits what the cluster has in all minus the demand of the active jobs (the cluster is
    taken to be Distillery's), and its largest single placement fits on one node.
A job that could never fit (more than the cluster has in all) is refused at submit with 422, unless
DISTILLERY_CLUSTER_AUTOSCALES=1: then it waits queued, its record saying for what.
"""

from __future__ import annotations

from dataclasses import dataclass

from student_worker.config import JobSpec

from .rayapi import Cluster

# Resource name in Ray -> how a person reads it, and the unit it is counted in.
LABELS = {"CPU": ("CPU", 1.0), "GPU": ("GPU", 1.0), "memory": ("GiB memory", 2.0**30)}
EPS = 1e-9


@dataclass(frozen=True)
class Demand:
    total: dict[str, float]
    largest: dict[str, float]  # the largest single placement: one worker or one teacher replica
    what: str  # e.g. "2 workers x 1 CPU"


def demand(spec: JobSpec) -> Demand:
    res = spec.resources
    worker = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker, "memory": res.memory_gb_per_worker * 2**30}
    total = {k: v * res.workers for k, v in worker.items()}
    largest = dict(worker)
    what = f"{res.workers} worker{'s' if res.workers != 1 else ''} x {_amounts(worker)}"
    actor = spec.teacher.ray_actor
    if actor is not None:
        replica = {"CPU": actor.num_cpus, "GPU": actor.num_gpus}
        for k, v in replica.items():
            total[k] += v * actor.replicas
            largest[k] = max(largest[k], v)
        what += f" + {actor.replicas} teacher replica{'s' if actor.replicas != 1 else ''} x {_amounts(replica)}"
    return Demand({k: v for k, v in total.items() if v}, {k: v for k, v in largest.items() if v}, what)


def never_fits(spec: JobSpec, cluster: Cluster) -> str | None:
    """Why the job could not start even on an idle cluster, with the numbers; None if it could."""
    need = demand(spec)
    for name, amount in need.total.items():
        have = cluster.total.get(name, 0.0)
        if amount > have + EPS:
            return (f"the job needs {_amount(name, amount)} ({need.what}); the cluster has "
                    f"{_amount(name, have)} in all ({cluster.nodes} node{'s' if cluster.nodes != 1 else ''})")
    for name, amount in need.largest.items():
        have = cluster.largest_node.get(name, 0.0)
        if amount > have + EPS:
            return (f"one placement of the job needs {_amount(name, amount)} on one node ({need.what}); "
                    f"the largest node has {_amount(name, have)}")
    return None


def wait_reason(spec: JobSpec, active: list[JobSpec], cluster: Cluster | None, max_running: int) -> str | None:
    """Why the job cannot start now; None when it can."""
    if max_running and len(active) >= max_running:
        return f"{len(active)} job{'s' if len(active) != 1 else ''} running, at most {max_running} at once"
    if cluster is None:
        return "Ray's dashboard did not answer: its free resources are unknown"
    if (too_big := never_fits(spec, cluster)) is not None:
        return f"{too_big}; waiting for the cluster to grow"
    need = demand(spec)
    used: dict[str, float] = {}
    for other in active:
        for name, amount in demand(other).total.items():
            used[name] = used.get(name, 0.0) + amount
    for name, amount in need.total.items():
        free = cluster.total.get(name, 0.0) - used.get(name, 0.0)
        if amount > free + EPS:
            return (f"needs {_amount(name, amount)} ({need.what}); {_amount(name, max(free, 0.0))} of "
                    f"{_amount(name, cluster.total.get(name, 0.0))} free with {len(active)} job"
                    f"{'s' if len(active) != 1 else ''} running")
    return None


def _amount(name: str, value: float) -> str:
    label, unit = LABELS.get(name, (name, 1.0))
    return f"{value / unit:g} {label}"


def _amounts(resources: dict[str, float]) -> str:
    return " + ".join(_amount(k, v) for k, v in resources.items() if v) or "nothing"
