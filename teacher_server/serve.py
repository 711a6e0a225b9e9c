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
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from . import defaults
from .batcher import Batcher, BatcherConfig
from .engine import EngineConfig, TeacherEngine

if TYPE_CHECKING:
    from .vllm_engine import VllmEngineConfig
from .metrics import TeacherMetrics
from .pb import teacher_pb2 as pb
from .pb import teacher_pb2_grpc as pb_grpc
from .servicer import BearerAuth, TeacherServicer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name  # distillery.teacher.v1.Teacher
DEFAULT_PORT = defaults.DEFAULT_PORT


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    # The vLLM engine instead of `engine` (transformers) and our batcher: vLLM batches
    # continuously by itself and bounds the calls in flight with its own max_queue.
    vllm: "VllmEngineConfig | None" = None
    host: str = defaults.HOST  # loopback unless the operator says otherwise
    port: int = DEFAULT_PORT  # 0 picks a free port (written to port_file)
    port_file: str | None = None
    max_message_mb: int = defaults.MAX_MESSAGE_MB  # largest reply (and the cap Score/Generate are checked against)
    # Largest request. 32 MiB holds 1024 sequences of 8192 int32 tokens; a bigger request is refused
    # by gRPC before it is read into memory.
    max_request_mb: int = defaults.MAX_REQUEST_MB
    # Threads serving RPCs: at least this many, and always room for the batcher's queue and batch
    # plus Info/health. There is no second concurrency limit: calls beyond the threads wait for
    # one, and the one refusal a caller can get for load is the full queue's, with the retry marker.
    rpc_threads: int = defaults.RPC_THREADS
    torch_threads: int | None = None  # engine threads on CPU; None keeps torch's default
    token: str | None = None  # bearer token required on teacher calls when set
    metrics_port: int | None = None  # Prometheus exporter; None disables it
    grace_s: float = defaults.GRACE_S  # in-flight calls get this long after SIGTERM
    drain_delay_s: float = defaults.DRAIN_DELAY_S  # NOT_SERVING is visible this long before the port closes


class TeacherServer:
    """The server and its parts; `start()` binds, `load()` brings the engine in, `stop()` drains."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = TeacherMetrics()
        send = config.max_message_mb * 1024 * 1024
        self.servicer = TeacherServicer(self.metrics, max_reply_bytes=send)
        self.health = health.HealthServicer()
        self.batcher: Batcher | None = None
        self.engine = None
        b = config.batcher
        # A running Generate batch and a Score step run inside it can both be out of the queue.
        self.rpc_threads = max(config.rpc_threads, b.max_queue + 2 * b.max_batch_requests + 16)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.rpc_threads, thread_name_prefix="rpc"),
            interceptors=[BearerAuth(config.token)] if config.token else [],
            options=[("grpc.max_receive_message_length", config.max_request_mb * 1024 * 1024),
                     ("grpc.max_send_message_length", send),
                     # A taken port is an error, not shared: with gRPC's default SO_REUSEPORT a
                     # second teacher would silently take half of the first one's connections.
                     ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_TeacherServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, (SERVICE_NAME, health.SERVICE_NAME))
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
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        if engine is None and self.config.vllm is not None:
            from .vllm_engine import VllmEngine

            engine = VllmEngine.load(self.config.vllm, metrics=self.metrics)
            engine.warmup()  # its first request compiles: before SERVING, not in a caller's call
        engine = engine or TeacherEngine.load(self.config.engine)
        self.engine = engine
        if not getattr(engine, "batches_itself", False):
            self.batcher = Batcher(engine, self.config.batcher, self.metrics).start()
        self.servicer.attach(engine, self.batcher)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        info = engine.info()
        log.info("teacher SERVING %s (vocab %d, %s on %s, %s)", info.model_name, info.vocab_size,
                 info.dtype, info.device, info.engine)

    def stop(self) -> None:
        self.servicer.draining = True
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        time.sleep(self.config.drain_delay_s)
        self.server.stop(self.config.grace_s).wait()
        if self.batcher is not None:
            self.batcher.stop()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Server reflection under both names clients use: grpc.reflection.v1 (current tools) and
    v1alpha (older ones). The two protocols are the same messages under another package name, so
    one reflection servicer answers both; v1 is routed to it with v1alpha's message codecs."""
    names = (*services, REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))


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
