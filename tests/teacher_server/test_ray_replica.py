"""TeacherReplica, the class each Ray teacher actor runs, exercised without Ray: it serves the
engine options it is given over gRPC, answers as the in-process teacher does, and stops. (Replicas
inside a Ray cluster, restarts included: tests/student_worker/test_ray_job.py, slow.)"""

from __future__ import annotations

import os

import grpc
import pytest
import torch

from teacher_server.client import TeacherClient
from teacher_server.in_process import LocalTeacher
from teacher_server.ray_replica import TeacherReplica


def test_a_replica_serves_its_engine_options_and_stops(tiny_llama):
    replica = TeacherReplica({"model_dir": str(tiny_llama), "dtype": "float32"}, "127.0.0.1", 0)
    try:
        endpoint = replica.endpoint()
        assert endpoint == f"127.0.0.1:{replica.server.port}" and replica.server.port > 0
        assert replica.pid() == os.getpid()
        local = LocalTeacher.from_model_dir(str(tiny_llama))
        seqs = [torch.tensor([1, 5, 9, 12, 7, 30]), torch.tensor([2, 40, 41])]
        with TeacherClient(endpoint, timeout_s=30) as client:
            assert client.info().tokenizer_fingerprint == local.info().tokenizer_fingerprint != ""
            served = client.score(seqs, [1, 2], top_k=4)
        for got, want in zip(served, local.score(seqs, [1, 2], top_k=4)):
            assert torch.equal(got.topk_ids, want.topk_ids)
            torch.testing.assert_close(got.token_logprobs, want.token_logprobs, atol=1e-5, rtol=1e-5)
    finally:
        replica.stop()
    with grpc.insecure_channel(endpoint) as channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=0.5)  # nothing listens any more
