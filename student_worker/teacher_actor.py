"""The teacher inside the Ray cluster: gRPC teacher servers hosted by restartable Ray actors.

A job whose spec has `teacher.ray_actor` gets `replicas` actors, each running the same
`TeacherServer` a standalone `distillery teacher serve` runs, so workers talk to them through the
usual `TeacherClient` (round-robin, retries). The driver picks each replica's port once; a replica
that dies is restarted by Ray on the same port, and clients retry UNAVAILABLE until it is back.
"""

from __future__ import annotations

import os
import socket

import ray

from .config import TeacherActorSpec


class TeacherReplica:
    def __init__(self, spec_json: str, host: str, port: int) -> None:
        from teacher_server.engine import EngineConfig
        from teacher_server.serve import ServerConfig, TeacherServer

        spec = TeacherActorSpec.model_validate_json(spec_json)
        self.host, self.port = host, port
        self.server = TeacherServer(ServerConfig(
            engine=EngineConfig(model_dir=spec.model, revision=spec.revision, device=spec.device, dtype=spec.dtype),
            host=host, port=port, drain_delay_s=0.0, grace_s=5.0))
        self.server.start()
        self.server.load()

    def endpoint(self) -> str:
        host = self.host if self.host in ("127.0.0.1", "localhost") else ray.util.get_node_ip_address()
        return f"{host}:{self.server.port}"

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TeacherReplicas:
    """Start `spec.replicas` teacher actors; `endpoints` for the workers; `stop()` at the end."""

    def __init__(self, spec: TeacherActorSpec, job_id: str, host: str = "127.0.0.1") -> None:
        actor = ray.remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                           max_restarts=spec.max_restarts, max_task_retries=-1)(TeacherReplica)
        self.actors = [
            actor.options(name=f"distillery-teacher-{job_id}-{i}").remote(
                spec.model_dump_json(), host, _free_port(host))
            for i in range(spec.replicas)
        ]
        self.endpoints = ray.get([a.endpoint.remote() for a in self.actors])

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def stop(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead replica needs no stopping
                pass
            ray.kill(a, no_restart=True)
