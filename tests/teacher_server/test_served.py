"""A real teacher server process, through `TeacherClient`: served answers equal in-process ones.

R-44: served answers equal in-process answers (fp32, CPU, tight tolerance), with and without
batching, whatever the padding. `LocalTeacher` over the same model directory is the reference;
the server merges concurrent requests with others, so each request is padded differently there.

Also: seeded Generate, Info, round-robin over endpoints, the bearer token, server reflection and
the Prometheus endpoint.
"""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from teacher_server.client import TeacherClient
from teacher_server.contract import InvalidRequest, SamplingParams, TeacherError
from teacher_server.in_process import LocalTeacher
from teacher_server.process import free_port

ATOL = 1e-5
TOKEN = "s3cret"
LENGTHS = [1, 7, 12, 3, 30, 2, 16, 5]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def local(tiny_llama) -> LocalTeacher:
    return LocalTeacher.from_model_dir(str(tiny_llama))


@pytest.fixture(scope="module")
def client(served_llama):
    with TeacherClient(served_llama.endpoint, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def metered(start_server_fn, tiny_llama, tmp_path_factory):
    """Two more servers, started together, each with a Prometheus port:
    "unbatched" (--max-batch-requests 1) and "guarded" (--token)."""
    start_server = start_server_fn
    tmp = tmp_path_factory.mktemp("metered")
    ports = {"unbatched": free_port(), "guarded": free_port()}
    flags = {"unbatched": ["--max-batch-requests", "1"], "guarded": ["--token", TOKEN]}
    env = {"DISTILLERY_TEACHER_TOKEN": ""}  # only --token decides
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(start_server, tiny_llama, tmp / name, *flags[name],
                                     "--max-wait-ms", "20", "--metrics-port", str(ports[name]),
                                     "--drain-delay-s", "0", env=env)
                   for name in ports}
        errors = []
        servers = {}
        for name, fut in futures.items():
            try:
                servers[name] = fut.result()
                servers[name].metrics_port = ports[name]
            except Exception as exc:  # noqa: BLE001 - stop whatever did start, then fail
                errors.append(exc)
    if not errors:
        yield servers
    with ThreadPoolExecutor(2) as pool:  # stop both at once (each by its pid)
        list(pool.map(lambda s: s.stop(), servers.values()))
    if errors:
        raise errors[0]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------------------------------- helpers
def sequences(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g) for n in lengths]


def starts_for(lengths: list[int]) -> list[int]:
    return [n if n in (1, 12) else max(1, n // 3) for n in lengths]


def assert_same_scores(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.topk_ids.dtype == torch.int64 and torch.equal(a.topk_ids, b.topk_ids)
        for name in ("topk_logprobs", "token_logprobs", "full_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            if y is None:
                assert x is None
            else:
                assert x.dtype == torch.float32
                torch.testing.assert_close(x, y, atol=ATOL, rtol=1e-5)


def assert_same_generations(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert a.finish_reason == b.finish_reason
        for name in ("token_logprobs", "topk_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if y is not None:
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)
        assert (a.topk_ids is None and b.topk_ids is None) or torch.equal(a.topk_ids, b.topk_ids)


def score_concurrently(teacher, local, n: int = 12) -> None:
    """n callers at once, each with its own sequences and settings; each answer equals local."""
    settings = [dict(top_k=8), dict(top_k=3, temperature=0.7), dict(top_k=8, full_logprobs=True)]
    jobs = []
    for i in range(n):
        lengths = [LENGTHS[(i + j) % len(LENGTHS)] for j in range(1 + i % 3)]
        jobs.append((sequences(lengths, seed=100 + i), starts_for(lengths), settings[i % 3]))
    barrier = threading.Barrier(n)

    def call(job):
        seqs, starts, kw = job
        barrier.wait()
        return teacher.score(seqs, starts, **kw)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(call, jobs))
    for (seqs, starts, kw), got in zip(jobs, answers):
        assert_same_scores(got, local.score(seqs, starts, **kw))


# ------------------------------------------------------------------------- served == in-process
def test_info_equals_local(client, local):
    info = client.info()
    assert info == local.info()
    assert info.vocab_size == 512 and info.dtype == "float32" and info.device == "cpu"
    assert len(info.tokenizer_fingerprint) == 64


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_as_one_request_equals_local(client, local, temperature):
    seqs, starts = sequences(LENGTHS), starts_for(LENGTHS)
    got = client.score(seqs, starts, top_k=8, temperature=temperature, full_logprobs=True)
    assert_same_scores(got, local.score(seqs, starts, top_k=8, temperature=temperature, full_logprobs=True))
    assert [len(s.token_logprobs) for s in got] == [n - f for n, f in zip(LENGTHS, starts)]
    assert got[0].full_logprobs.shape == (0, 512)  # length-1 sequence: nothing to score


def test_score_as_concurrent_requests_equals_local(client, local):
    score_concurrently(client, local)


def test_generate_with_seed_equals_local(client, local):
    prompts = [p.clamp_min(3) for p in sequences([3, 1, 9, 5], seed=7)]
    for params in (
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=42, return_logprobs=True,
                       logprobs_top_k=4),
        SamplingParams(max_new_tokens=6, temperature=0.75, top_k=20, top_p=0.875, seed=3,
                       return_logprobs=True),
        SamplingParams(max_new_tokens=5, temperature=0.0, return_logprobs=True),
    ):
        assert_same_generations(client.generate(prompts, params), local.generate(prompts, params))


def test_concurrent_generates_equal_local(client, local):
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s, return_logprobs=True)
              for s in range(6)]
    prompts = [[p.clamp_min(3) for p in sequences([2 + i, 6 - i], seed=20 + i)] for i in range(6)]
    barrier = threading.Barrier(6)

    def call(i):
        barrier.wait()
        return client.generate(prompts[i], params[i])

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, range(6)))
    for i, got in enumerate(answers):
        assert_same_generations(got, local.generate(prompts[i], params[i]))


def test_invalid_request_is_refused_like_local(client, local):
    with pytest.raises(InvalidRequest) as served:
        client.score([torch.tensor([1, 600])], [1], top_k=2)
    with pytest.raises(InvalidRequest) as in_process:
        local.score([torch.tensor([1, 600])], [1], top_k=2)
    assert str(served.value) == str(in_process.value)


def test_reflection_lists_the_teacher_service(served_llama):
    with grpc.insecure_channel(served_llama.endpoint) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "distillery.teacher.v1.Teacher" in services
        assert "grpc.health.v1.Health" in services
        service = DescriptorPool(db).FindServiceByName("distillery.teacher.v1.Teacher")
        assert [m.name for m in service.methods] == ["Info", "Score", "Generate"]


def test_reflection_answers_on_v1_as_well_as_v1alpha(served_llama):
    """Current tools ask grpc.reflection.v1, older ones v1alpha; both list and describe."""
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    with grpc.insecure_channel(served_llama.endpoint) as channel:
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                response_deserializer=rpb.ServerReflectionResponse.FromString)
            asks = [rpb.ServerReflectionRequest(list_services=""),
                    rpb.ServerReflectionRequest(file_containing_symbol="distillery.teacher.v1.Teacher")]
            listed, described = list(call(iter(asks), timeout=10))
            names = {s.name for s in listed.list_services_response.service}
            assert {"distillery.teacher.v1.Teacher", "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection"} <= names, (version, names)
            assert described.file_descriptor_response.file_descriptor_proto, version


# ------------------------------------------------------------------- more servers (slow setup)
@pytest.mark.slow
def test_unbatched_server_equals_local_and_never_merges(metered, local):
    server = metered["unbatched"]
    with TeacherClient(server.endpoint, timeout_s=60) as c:
        seqs, starts = sequences(LENGTHS, seed=3), starts_for(LENGTHS)
        assert_same_scores(c.score(seqs, starts, top_k=5), local.score(seqs, starts, top_k=5))
        score_concurrently(c, local, n=8)
    metrics = scrape(server.metrics_port)
    batches = sample(metrics, "distillery_teacher_batch_requests_count", kind="score")
    requests = sample(metrics, "distillery_teacher_batch_requests_sum", kind="score")
    assert batches >= 9 and requests == batches  # one request per engine call


@pytest.mark.slow
def test_batching_server_merges_concurrent_requests_and_equals_local(metered, local):
    server = metered["guarded"]
    before = scrape(server.metrics_port)
    with TeacherClient(server.endpoint, timeout_s=60, token=TOKEN) as c:
        score_concurrently(c, local, n=12)
    after = scrape(server.metrics_port)
    batches, requests = (sample(after, name, kind="score") - sample(before, name, kind="score")
                         for name in ("distillery_teacher_batch_requests_count",
                                      "distillery_teacher_batch_requests_sum"))
    assert requests == 12
    assert batches < 12  # some requests shared a forward


@pytest.mark.slow
def test_metrics_endpoint_counts_tokens(metered):
    server = metered["unbatched"]
    before = scrape(server.metrics_port)
    seqs = sequences([4, 9, 2], seed=5)
    with TeacherClient(server.endpoint, timeout_s=60) as c:
        c.score(seqs, [1, 1, 1], top_k=1)
        first = c.generate([torch.tensor([5, 6, 7])], SamplingParams(max_new_tokens=4, seed=1))
        # Stops at its first token: 1 token generated out of a budget of 10.
        stopped = c.generate([torch.tensor([5, 6, 7])], SamplingParams(
            max_new_tokens=10, seed=1, stop_ids=(int(first[0].token_ids[0]),)))
    assert len(stopped[0].token_ids) == 1
    after = scrape(server.metrics_port)
    tokens = "distillery_teacher_tokens_total"
    assert sample(after, tokens, kind="score") - sample(before, tokens, kind="score") == 15
    assert sample(after, tokens, kind="generate") - sample(before, tokens, kind="generate") == 4 + 1
    waits = "distillery_teacher_queue_wait_seconds_count"
    assert sample(after, waits, kind="score") - sample(before, waits, kind="score") == 1
    assert sample(after, waits, kind="generate") - sample(before, waits, kind="generate") == 2
    ttft = "distillery_teacher_time_to_first_token_seconds_count"
    assert sample(after, ttft) - sample(before, ttft) == 2
    calls = "distillery_teacher_request_seconds_count"
    ok = dict(method="Score", code="OK")
    assert sample(after, calls, **ok) - sample(before, calls, **ok) == 1


@pytest.mark.slow
def test_round_robin_spreads_calls_over_endpoints(metered):
    servers = [metered["unbatched"], metered["guarded"]]
    calls = "distillery_teacher_request_seconds_count"
    before = [sample(scrape(s.metrics_port), calls, method="Score", code="OK") for s in servers]
    with TeacherClient([s.endpoint for s in servers], timeout_s=60, token=TOKEN) as c:
        for i in range(6):
            assert len(c.score([torch.tensor([3, 4, 5 + i])], [1], top_k=2)) == 1
    after = [sample(scrape(s.metrics_port), calls, method="Score", code="OK") for s in servers]
    assert [a - b for a, b in zip(after, before)] == [3, 3]


@pytest.mark.slow
def test_bearer_token_is_required_except_for_health_and_reflection(metered, local):
    server = metered["guarded"]
    for token in (None, "wrong", TOKEN + "x", ""):
        with TeacherClient(server.endpoint, timeout_s=10, token=token) as c:
            with pytest.raises(TeacherError, match="UNAUTHENTICATED"):
                c.info()
            with pytest.raises(TeacherError, match="UNAUTHENTICATED"):
                c.score([torch.tensor([1, 2])], [1], top_k=1)
    with TeacherClient(server.endpoint, timeout_s=30, token=TOKEN) as c:
        assert c.info() == local.info()
        seqs = sequences([6, 3], seed=9)
        assert_same_scores(c.score(seqs, [1, 2], top_k=4), local.score(seqs, [1, 2], top_k=4))
    with grpc.insecure_channel(server.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "distillery.teacher.v1.Teacher"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "distillery.teacher.v1.Teacher" in ProtoReflectionDescriptorDatabase(channel).get_services()
