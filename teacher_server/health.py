"""One grpc.health.v1 check of a teacher server, without torch (the API's /readyz imports this)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving(endpoint: str, timeout_s: float = 1.0) -> bool:
    """True when `endpoint` answers SERVING within `timeout_s`; False when it answers anything
    else, refuses the connection or stays silent. Each check opens its own channel (no shared
    subchannel): a kept one would wait out gRPC's reconnect backoff, up to two minutes, after a
    teacher restart."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(endpoint, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
