"""The server's path for an engine that batches by itself (vLLM): calls go straight from the RPC
threads to the engine, with the same answers, status codes, deadlines and Info as through our
batcher. Exercised with the transformers engine marked as self-batching, so it runs without vLLM."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from teacher_server.client import TeacherClient
from teacher_server.contract import InvalidRequest, SamplingParams
from teacher_server.engine import EngineConfig, TeacherEngine
from teacher_server.in_process import LocalTeacher
from teacher_server.pb import teacher_pb2 as pb
from teacher_server.pb import teacher_pb2_grpc as pb_grpc
from teacher_server.serve import ServerConfig, TeacherServer


class SelfBatching(TeacherEngine):
    batches_itself = True


@pytest.fixture(scope="module")
def served(tiny_llama):
    engine = SelfBatching.load(EngineConfig(model_dir=str(tiny_llama)))
    server = TeacherServer(ServerConfig(engine=engine.config, port=0, grace_s=2.0, drain_delay_s=0.0))
    port = server.start()
    server.load(engine)
    assert server.batcher is None
    yield server, port, LocalTeacher(TeacherEngine.load(EngineConfig(model_dir=str(tiny_llama))))
    server.stop()


def test_answers_equal_in_process_and_info_names_the_engine(served):
    server, port, local = served
    with TeacherClient(f"127.0.0.1:{port}", timeout_s=30) as client:
        info = client.info()
        assert info.engine.startswith("transformers 5.") and info == local.info()
        seqs = [torch.tensor([1, 5, 9, 30, 7]), torch.tensor([4, 4, 8])]
        got, want = client.score(seqs, [2, 1], top_k=4), local.score(seqs, [2, 1], top_k=4)
        for g, w in zip(got, want):
            assert torch.equal(g.topk_ids, w.topk_ids)
            torch.testing.assert_close(g.token_logprobs, w.token_logprobs)
            torch.testing.assert_close(g.tail_logprobs, w.tail_logprobs)
        params = SamplingParams(max_new_tokens=5, seed=3, return_logprobs=True)
        gen = client.generate([torch.tensor([1, 2, 3])], params)
        assert torch.equal(gen[0].token_ids, local.generate([torch.tensor([1, 2, 3])], params)[0].token_ids)
        with pytest.raises(InvalidRequest):
            client.score([torch.tensor([1, 10_000])], [1], top_k=2)


def test_no_deadline_works_and_a_passed_deadline_is_deadline_exceeded(served):
    _, port, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TeacherStub(channel)
        request = pb.GenerateRequest(prompts=[pb.Tensor(dtype=pb.DTYPE_INT32, shape=[3],
                                                        data=torch.tensor([1, 2, 3], dtype=torch.int32).numpy().tobytes())],
                                     max_new_tokens=400, seed=1)
        reply = stub.Generate.future(request).result(timeout=120)  # no deadline on the wire
        assert len(reply.generations[0].token_ids.data) == 4 * 400
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 5
