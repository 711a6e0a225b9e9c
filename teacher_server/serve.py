"""Run the teacher gRPC server: bind, report NOT_SERVING, load the model, SERVING, drain on SIGTERM.

    distillery teacher serve --model ./my-teacher --port 50051 --device cuda --dtype bfloat16

Order of events: the port is bound first (so health checks can answer NOT_SERVING while the
weights load); after SIGTERM / SIGINT health turns NOT_SERVING at once, new calls get UNAVAILABLE,
in-flight calls finish within the grace period, then the process exits.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .batcher import Batcher, BatcherConfig
from .engine import EngineConfig, TeacherEngine
from .metrics import TeacherMetrics
from .pb import teacher_pb2 as pb
from .pb import teacher_pb2_grpc as pb_grpc
from .servicer import BearerAuth, TeacherServicer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name  # distillery.teacher.v1.Teacher
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = DEFAULT_PORT  # 0 picks a free port (written to port_file)
    port_file: str | None = None
    max_message_mb: int = 256
    # RPCs held at once: at least this many, and always room for the batcher's queue and batch
    # plus Info/health, so that the queue refuses work first (its refusals carry the retry marker).
    rpc_threads: int = 128
    token: str | None = None  # bearer token required on teacher calls when set
    metrics_port: int | None = None  # Prometheus exporter; None disables it
    grace_s: float = 30.0  # in-flight calls get this long after SIGTERM
    drain_delay_s: float = 0.5  # NOT_SERVING is visible this long before the port closes


class TeacherServer:
    """The server and its parts; `start()` binds, `load()` brings the engine in, `stop()` drains."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = TeacherMetrics()
        self.servicer = TeacherServicer(self.metrics)
        self.health = health.HealthServicer()
        self.batcher: Batcher | None = None
        size = config.max_message_mb * 1024 * 1024
        b = config.batcher
        self.rpc_limit = max(config.rpc_threads, b.max_queue + b.max_batch_requests + 16)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.rpc_limit, thread_name_prefix="rpc"),
            interceptors=[BearerAuth(config.token)] if config.token else [],
            options=[("grpc.max_receive_message_length", size),
                     ("grpc.max_send_message_length", size),
                     # A taken port is an error, not shared: with gRPC's default SO_REUSEPORT a
                     # second teacher would silently take half of the first one's connections.
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.rpc_limit,
        )
        pb_grpc.add_TeacherServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> int:
        cfg = self.config
        self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        self.server.start()
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry)
        if cfg.port_file:
            tmp = Path(cfg.port_file + ".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(cfg.port_file)
        log.info("teacher listening on %s:%d (NOT_SERVING until the model is loaded)", cfg.host, self.port)
        return self.port

    def load(self, engine: TeacherEngine | None = None) -> None:
        engine = engine or TeacherEngine.load(self.config.engine)
        self.batcher = Batcher(engine, self.config.batcher, self.metrics).start()
        self.servicer.attach(engine, self.batcher)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        info = engine.info()
        log.info("teacher SERVING %s (vocab %d, %s on %s)", info.model_name, info.vocab_size,
                 info.dtype, info.device)

    def stop(self) -> None:
        self.servicer.draining = True
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        time.sleep(self.config.drain_delay_s)
        self.server.stop(self.config.grace_s).wait()
        if self.batcher is not None:
            self.batcher.stop()


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain; the exit code is 1 when the model failed to load."""
    stop = threading.Event()
    failed = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = TeacherServer(config)
    server.start()
    print(f"teacher: listening on {config.host}:{server.port}", flush=True)
    loader = threading.Thread(target=_load_or_stop, args=(server, stop, failed), daemon=True)
    loader.start()
    # Wake up now and then: Python runs signal handlers only in the main thread, between bytecodes,
    # and a SIGTERM the kernel hands to another thread does not interrupt an untimed wait here.
    while not stop.wait(0.1):
        pass
    print("teacher: draining", flush=True)
    server.stop()
    print("teacher: stopped", flush=True)
    return 1 if failed.is_set() else 0


def _load_or_stop(server: TeacherServer, stop: threading.Event, failed: threading.Event) -> None:
    try:
        server.load()
        print(f"teacher: SERVING {server.servicer.engine.name}", flush=True)
    except Exception:
        log.exception("could not load the teacher model")
        failed.set()
        stop.set()
