"""/readyz with a teacher configured (DISTILLERY_TEACHER_ENDPOINT): ready only while it is SERVING,
again as soon as it is back on its port; the field is absent when no teacher is configured. The teacher is a grpc.health.v1 server in this
process, on a 127.0.0.1 ephemeral port."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from fastapi.testclient import TestClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.api import create_app
from services.settings import Settings


def health_server(port: int = 0) -> tuple[grpc.Server, health.HealthServicer, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    status = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, status, port


def test_readyz_follows_the_teachers_health(redis_url, redis_prefix):
    server, status, port = health_server()
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix, teacher_endpoint=f"127.0.0.1:{port}")
    try:
        with TestClient(create_app(settings, ray_ping=lambda: True)) as client:
            status.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # loading its weights
            r = client.get("/readyz")
            assert r.status_code == 503
            assert r.json() == {"status": "not_ready", "redis": True, "ray": True, "teacher": False}
            status.set("", health_pb2.HealthCheckResponse.SERVING)
            r = client.get("/readyz")
            assert r.status_code == 200 and r.json()["teacher"] is True
            server.stop(None).wait()
            start = time.monotonic()
            r = client.get("/readyz")
            assert r.status_code == 503 and r.json()["teacher"] is False
            assert time.monotonic() - start < 2, "a teacher that is gone costs at most the check's timeout"
            server, status, _ = health_server(port)  # restarted on its port: ready at the next check
            status.set("", health_pb2.HealthCheckResponse.SERVING)
            assert client.get("/readyz").json()["teacher"] is True
    finally:
        server.stop(None)
    with TestClient(create_app(Settings(redis_url=redis_url, redis_prefix=redis_prefix),
                               ray_ping=lambda: True)) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready", "redis": True, "ray": True}
