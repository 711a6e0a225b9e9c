"""Container health check: exit 0 when the target answers healthy, 1 otherwise (Docker HEALTHCHECK).

    python healthcheck.py grpc://127.0.0.1:50051         # grpc.health.v1 Check(service="") is SERVING
    python healthcheck.py http://127.0.0.1:8000/readyz    # any 2xx answer

Standard library plus grpcio only (both images have them), so it runs where the service runs.
Kubernetes does not need it: its probes speak gRPC health and HTTP natively.
"""

from __future__ import annotations

import sys
import urllib.request

TIMEOUT_S = 3.0


def grpc_serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError:  # not listening yet, or gone
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP(S)_PROXY
    try:
        with direct.open(url, timeout=TIMEOUT_S) as reply:
            return 200 <= reply.status < 300
    except OSError:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: healthcheck.py grpc://HOST:PORT | http://HOST:PORT/PATH", file=sys.stderr)
        return 2
    target = argv[0]
    if target.startswith("grpc://"):
        ok = grpc_serving(target.removeprefix("grpc://"))
    elif target.startswith(("http://", "https://")):
        ok = http_ok(target)
    else:
        print(f"healthcheck: unknown target {target!r}", file=sys.stderr)
        return 2
    if not ok:
        print(f"healthcheck: {target} is not healthy", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
