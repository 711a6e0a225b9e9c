"""The teacher inside a Ray cluster: gRPC teacher servers hosted by restartable Ray actors.

A job whose spec has `teacher.ray_actor` gets `replicas` actors (student_worker.run starts them),
each running the same `TeacherServer` a standalone `distillery teacher serve` runs, so workers talk
to them through the usual `TeacherClient` (round-robin, retries). The driver picks each replica's
port once; a replica that dies is restarted by Ray on the same port, and clients retry UNAVAILABLE
until it is back. Replica i of job J is the named actor `distillery-teacher-J-i`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ray

from .process import free_port


class TeacherReplica:
    def __init__(self, engine: Mapping[str, Any], host: str, port: int) -> None:
        from .engine import EngineConfig
        from .serve import ServerConfig, TeacherServer

        self.host, self.port = host, port
        self.server = TeacherServer(ServerConfig(engine=EngineConfig(**engine), host=host, port=port,
                                                 drain_delay_s=0.0, grace_s=5.0))
        self.server.start()
        self.server.load()

    def endpoint(self) -> str:
        host = self.host if self.host in ("127.0.0.1", "localhost") else ray.util.get_node_ip_address()
        return f"{host}:{self.server.port}"

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop()


class TeacherReplicas:
    """Start `replicas` teacher actors, each serving an engine.EngineConfig(**engine) (plain values:
    the driver imports no torch); `endpoints` for the workers; `stop()` at the end. `num_cpus` /
    `num_gpus` are reserved per replica; `max_restarts` -1 restarts a dead replica always."""

    def __init__(self, engine: Mapping[str, Any], job_id: str, *, replicas: int = 1, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, max_restarts: int = -1, host: str = "127.0.0.1") -> None:
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                           max_task_retries=-1)(TeacherReplica)
        self.actors = [actor.options(name=f"distillery-teacher-{job_id}-{i}").remote(dict(engine), host, free_port(host))
                       for i in range(replicas)]
        self.endpoints = ray.get([a.endpoint.remote() for a in self.actors])

    def stop(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead replica needs no stopping
                pass
            ray.kill(a, no_restart=True)
