"""Reliability of the served teacher (R-10 .. R-16), against real server processes on 127.0.0.1.

Every test talks to a `distillery teacher serve` subprocess over gRPC. Bad input goes through the
generated stub as raw protobuf messages, so the client's own conversion cannot hide anything.
Faults are signals sent to the pids these tests started; every process is stopped by pid.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from teacher_server.client import TeacherClient
from teacher_server.contract import RETRYABLE_KEY, TeacherError, TeacherUnavailable
from teacher_server.pb import teacher_pb2 as pb
from teacher_server.pb import teacher_pb2_grpc as pb_grpc
from teacher_server.process import free_port
from teacher_server.serve import SERVICE_NAME

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

LONG_NEW_TOKENS = 1900  # on `slow_model` a generation of this length takes many seconds on CPU
PROMPT = list(range(3, 11))


# ---------------------------------------------------------------------------------------- helpers
def ids_pb(ids, dtype=pb.DTYPE_INT32, shape=None) -> pb.Tensor:
    np_dtype = {pb.DTYPE_INT32: "<i4", pb.DTYPE_INT64: "<i8", pb.DTYPE_FLOAT32: "<f4"}[dtype]
    arr = np.asarray(ids, dtype=np_dtype)
    return pb.Tensor(dtype=dtype, shape=list(arr.shape) if shape is None else shape, data=arr.tobytes())


def raw_tensor(dtype, shape, data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def score_req(*seqs, score_from=None, **kw) -> pb.ScoreRequest:
    seqs = seqs or (PROMPT,)
    froms = score_from or [1] * len(seqs)
    return pb.ScoreRequest(sequences=[pb.ScoreSequence(token_ids=s if isinstance(s, pb.Tensor) else ids_pb(s),
                                                       score_from=f) for s, f in zip(seqs, froms)],
                           **{"top_k": 4, **kw})


def gen_req(*prompts, **kw) -> pb.GenerateRequest:
    prompts = prompts or (PROMPT,)
    return pb.GenerateRequest(prompts=[p if isinstance(p, pb.Tensor) else ids_pb(p) for p in prompts],
                              **{"max_new_tokens": 4, "seed": 1, **kw})


class Raw:
    """The generated stub on its own channel: no client-side validation, conversion or retries."""

    def __init__(self, endpoint: str, **options) -> None:
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(endpoint, options=list(options.items()))
        self.stub = pb_grpc.TeacherStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call(self, method: str, request, timeout: float = 30.0):
        """(status code, reply or RpcError, seconds)."""
        start = time.monotonic()
        try:
            reply = getattr(self.stub, method)(request, timeout=timeout)
            return OK, reply, time.monotonic() - start
        except grpc.RpcError as err:
            return err.code(), err, time.monotonic() - start

    def check_health(self, service: str = "", timeout: float = 2.0):
        try:
            return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError as err:
            return err.code()

    def close(self) -> None:
        self.channel.close()


def retryable(err) -> bool:
    return any(k == RETRYABLE_KEY for k, _ in (err.trailing_metadata() or ()))


def scrape(port: int) -> dict[tuple, float]:
    """Prometheus samples of a server: {(name, (label=value, ...)): value}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05, probe=None):
    """Poll `predicate` until truthy; `probe()` (if given) describes the state on failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last: {probe()})" if probe else ""))
        time.sleep(interval)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def in_thread(fn, *args):
    """Run fn(*args) in a daemon thread; returns (thread, box) where box[0] gets the result."""
    box: list = []
    th = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
    th.start()
    return th, box


def assert_alive(server, raw: Raw) -> None:
    assert server.proc.poll() is None, f"server died:\n{server.log()[-3000:]}"
    code, reply, _ = raw.call("Info", pb.InfoRequest(), timeout=10)
    assert code == OK, reply


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A model big enough (and long enough) that a long generation takes many seconds on CPU."""
    from services.demo.tiny import build_model

    return build_model(tmp_path_factory.mktemp("slow-model"), family="llama", hidden=384, layers=6,
                       max_positions=2048, seed=3)


@pytest.fixture(scope="module")
def busy(slow_model, tmp_path_factory, start_server_fn):
    """Slow model, no batching, a queue of 4, metrics on."""
    metrics_port = free_port()
    server = start_server_fn(slow_model, tmp_path_factory.mktemp("busy"), "--max-queue", "4",
                          "--max-batch-requests", "1", "--metrics-port", str(metrics_port))
    server.metrics_port = metrics_port
    raw = Raw(server.endpoint)
    yield server, raw
    raw.close()
    server.stop()


@pytest.fixture(scope="module")
def strict(tiny_llama, tmp_path_factory, start_server_fn):
    """Tiny model with small limits: 1 MiB messages each way, top_k <= 16, full rows for <= 64
    positions."""
    metrics_port = free_port()
    server = start_server_fn(tiny_llama, tmp_path_factory.mktemp("strict"), "--max-message-mb", "1",
                          "--max-request-mb", "1",
                          "--top-k-limit", "16", "--max-full-row-positions", "64",
                          "--max-wait-ms", "100", "--metrics-port", str(metrics_port))
    server.metrics_port = metrics_port
    raw = Raw(server.endpoint)
    info = raw.stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.top_k_limit, info.max_full_row_positions) == (16, 64)
    yield server, raw, info
    raw.close()
    server.stop()


# ------------------------------------------------------------------------------- R-10 deadlines
@pytest.mark.slow
def test_r10_deadline_on_long_generate_is_prompt_and_the_work_stops(busy):
    server, raw = busy
    # How long the full generation would take: 100 tokens timed, extrapolated (lower bound, since
    # later steps attend over a longer cache).
    code, _, t100 = raw.call("Generate", gen_req(max_new_tokens=100, temperature=0.0), timeout=60)
    assert code == OK
    full_estimate = t100 / 100 * LONG_NEW_TOKENS
    assert full_estimate > 3.0, f"slow_model too fast ({full_estimate:.1f}s) for this test to mean anything"

    before = scrape(server.metrics_port)
    code, err, elapsed = raw.call("Generate", gen_req(max_new_tokens=LONG_NEW_TOKENS, temperature=0.0),
                                  timeout=0.3)
    assert code == DEADLINE, err
    assert elapsed < 1.0

    # The abandoned generation does not hold the engine: a small request is answered at once.
    code, reply, quick = raw.call("Score", score_req(), timeout=30)
    assert code == OK, reply
    assert quick < min(2.0, full_estimate / 2), (quick, full_estimate)

    after = wait_for(lambda: (s := scrape(server.metrics_port)) and metric(
        s, "distillery_teacher_cancelled_total") > metric(before, "distillery_teacher_cancelled_total")
        and s, 30, "the cancelled counter")
    delta = lambda name, **lab: metric(after, name, **lab) - metric(before, name, **lab)  # noqa: E731
    assert delta("distillery_teacher_cancelled_total") == 1
    # The request left its batch: the engine worked on it for about the deadline, not the whole run.
    assert delta("distillery_teacher_batch_requests_count", kind="generate") == 1
    assert delta("distillery_teacher_batch_seconds_sum", kind="generate") < min(1.5, full_estimate / 2)
    assert delta("distillery_teacher_request_seconds_count", method="Generate", code="DEADLINE_EXCEEDED") == 1


@pytest.mark.slow
def test_r10_score_waiting_in_the_queue_past_its_deadline_is_dropped(busy):
    server, raw = busy
    before = scrape(server.metrics_port)
    # Occupy the engine with one Score step it cannot split or interleave: 8 sequences of 2,000
    # tokens fill one step of --max-batch-tokens (16,384), several seconds on this model.
    big = score_req(*[list(np.arange(2000) % 500)] * 8, top_k=4)
    big_thread, big_box = in_thread(raw.call, "Score", big, 120)
    time.sleep(1.0)
    code, err, elapsed = raw.call("Score", score_req(), timeout=0.5)
    assert code == DEADLINE, err
    assert elapsed < 1.2
    big_thread.join(120)
    assert not big_thread.is_alive() and big_box[0][0] == OK
    assert big_box[0][2] > 2.0, "the big step was too quick to keep the small request waiting"

    after = wait_for(lambda: (s := scrape(server.metrics_port)) and metric(
        s, "distillery_teacher_cancelled_total") - metric(before, "distillery_teacher_cancelled_total") >= 1
        and s, 30, "the small request counted as cancelled")
    delta = lambda name, **lab: metric(after, name, **lab) - metric(before, name, **lab)  # noqa: E731
    assert delta("distillery_teacher_cancelled_total") == 1
    # The big request's single step ran; the small one never did.
    assert delta("distillery_teacher_batch_requests_count", kind="score") == 1
    assert delta("distillery_teacher_batch_requests_sum", kind="score") == 1
    assert delta("distillery_teacher_request_seconds_count", method="Score", code="DEADLINE_EXCEEDED") == 1
    code, reply, quick = raw.call("Score", score_req(), timeout=30)
    assert code == OK and quick < 2.0, reply


@pytest.mark.slow
def test_r10_cancelled_request_leaves_a_shared_batch_and_the_other_is_unharmed(strict):
    server, raw, info = strict
    params = dict(max_new_tokens=480, temperature=1.0, top_k=TOPK_LIMIT)
    doomed = gen_req([5, 6, 7, 8], seed=7, **params)
    survivor = gen_req([9, 10, 11, 12, 13], seed=11, **params)
    before = scrape(server.metrics_port)
    barrier = threading.Barrier(2)

    def go(req, timeout):
        barrier.wait()
        return raw.call("Generate", req, timeout=timeout)

    t1, box1 = in_thread(go, doomed, 0.4)
    t2, box2 = in_thread(go, survivor, 60)
    t1.join(30), t2.join(60)
    assert box1[0][0] == DEADLINE, box1
    assert box2[0][0] == OK, box2
    merged = scrape(server.metrics_port)
    # Both shared one engine call (the server waits 100 ms for company).
    assert metric(merged, "distillery_teacher_batch_requests_count", kind="generate") - \
        metric(before, "distillery_teacher_batch_requests_count", kind="generate") == 1
    assert metric(merged, "distillery_teacher_batch_requests_sum", kind="generate") - \
        metric(before, "distillery_teacher_batch_requests_sum", kind="generate") == 2
    assert metric(merged, "distillery_teacher_cancelled_total") - \
        metric(before, "distillery_teacher_cancelled_total") == 1
    # The survivor's answer is the one it gets alone: dropping the other row did not disturb it.
    code, alone, _ = raw.call("Generate", survivor, timeout=60)
    assert code == OK
    got = box2[0][1].generations[0]
    assert got.finish_reason == "length" and got.token_ids.data == alone.generations[0].token_ids.data
    assert len(got.token_ids.data) == 4 * 480


# ------------------------------------------------------------------------- R-11 message limits
def _oversized_score() -> pb.ScoreRequest:
    return score_req(list(range(500)) * 1100)  # 550k int32 ids, ~2.2 MB > 1 MiB


def test_r11_message_over_the_limit_is_resource_exhausted_and_next_request_succeeds(strict):
    server, raw, info = strict
    code, err, elapsed = raw.call("Score", _oversized_score(), timeout=30)
    assert code == EXHAUSTED, err
    assert not retryable(err)  # not a full queue: retrying the same message cannot help
    assert elapsed < 2.0
    code, reply, _ = raw.call("Score", score_req(), timeout=30)
    assert code == OK, reply
    assert_alive(server, raw)


def test_r11_a_reply_over_the_limit_is_refused_before_any_work_naming_the_numbers(strict):
    """The reply size is checked against the message limit up front: an INVALID_ARGUMENT in well
    under a second that says how big the reply would be, not a failure after the computation."""
    server, raw, _ = strict
    for method, request in (("Score", BAD_SCORE["reply over the message limit"]),
                            ("Generate", BAD_GENERATE["reply over the message limit"])):
        code, err, elapsed = raw.call(method, request, timeout=30)
        assert code == INVALID, err
        assert re.search(r"reply would take about [\d,]+ bytes .* limit of 1,048,576 bytes",
                         err.details()), err.details()
        assert elapsed < 1.0, (method, elapsed)
    assert_alive(server, raw)


def test_no_deadline_calls_are_answered(strict):
    """Stock clients send no deadline by default; both RPCs must work without one (no limit)."""
    server, raw, _ = strict
    score = raw.stub.Score.future(score_req(top_k=4))  # no timeout: no deadline on the wire
    generate = raw.stub.Generate.future(gen_req(max_new_tokens=3, seed=1))
    try:
        assert [list(s.topk_ids.shape) for s in score.result(timeout=60).sequences] == [[len(PROMPT) - 1, 4]]
        assert len(generate.result(timeout=60).generations[0].token_ids.data) == 3 * 4
    finally:
        score.cancel()
        generate.cancel()
    assert "internal error" not in server.log()


def test_r11_client_does_not_retry_an_oversized_message(strict):
    server, raw, info = strict
    seq = list(range(500)) * 1100
    with TeacherClient(server.endpoint, timeout_s=30) as client:  # shipped retry policy
        start = time.monotonic()
        with pytest.raises(TeacherError) as exc:
            client.score([seq], [1], top_k=4)
        elapsed = time.monotonic() - start
        assert not isinstance(exc.value, TeacherUnavailable)
        assert "larger than max" in str(exc.value)
        assert elapsed < 3.0, f"looks retried: {elapsed:.1f}s"
        assert client.score([PROMPT], [1], top_k=4)[0].topk_ids.shape == (len(PROMPT) - 1, 4)


# ------------------------------------------------------------------------- R-12 backpressure
def _burst(raw: Raw, n: int, request, timeout: float = 60.0):
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i):
        barrier.wait()
        code, reply, elapsed = raw.call("Score", request, timeout=timeout)
        results[i] = (code, reply, elapsed)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    assert hung == 0, f"{hung} of {n} requests still waiting after 120 s"
    return results


@pytest.mark.slow
def test_r12_backpressure_small_queue_refuses_quickly_and_memory_stays_flat(busy):
    server, raw = busy
    request = score_req(*[list(np.arange(256) % 500)] * 3, top_k=8)  # each takes the engine a while
    rss = []
    for round_ in range(2):
        before = scrape(server.metrics_port)
        results = _burst(raw, 64, request)
        codes = [r[0] for r in results]
        assert set(codes) <= {OK, EXHAUSTED}, codes
        ok, refused = codes.count(OK), codes.count(EXHAUSTED)
        assert ok >= 1 and refused >= 1, (ok, refused)
        for code, reply, elapsed in results:
            if code == EXHAUSTED:
                assert retryable(reply), reply.details()  # a full queue: worth retrying later
                assert elapsed < 2.0, elapsed
            else:
                assert [list(q.topk_ids.shape) for q in reply.sequences] == [[255, 8]] * 3
        after = scrape(server.metrics_port)
        assert metric(after, "distillery_teacher_rejected_total") - \
            metric(before, "distillery_teacher_rejected_total") == refused
        assert metric(after, "distillery_teacher_queue_depth") == 0
        rss.append(rss_mb(server.pid))
    assert rss[1] < rss[0] + 50, f"RSS grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB"
    assert_alive(server, raw)


@pytest.mark.slow
def test_r12_a_burst_beyond_the_rpc_threads_gets_one_kind_of_refusal(busy):
    """160 concurrent calls against 128 RPC threads and a queue of 4: whatever is refused is
    refused by the queue, with the retry marker; gRPC's own concurrency limit (which answers
    without the marker, so clients would not retry) never fires."""
    server, raw = busy
    results = _burst(raw, 160, score_req(list(np.arange(64) % 500), top_k=4))
    codes = [r[0] for r in results]
    assert set(codes) <= {OK, EXHAUSTED}, codes
    assert codes.count(OK) >= 1 and codes.count(EXHAUSTED) >= 1, codes
    for code, reply, _ in results:
        if code == EXHAUSTED:
            assert retryable(reply), reply.details()
            assert "queue is full" in reply.details(), reply.details()
    assert_alive(server, raw)


# --------------------------------------------------------------------------------- R-13 health
def test_r13_not_serving_while_loading_then_serving(server_factory, tiny_llama):
    server = server_factory(tiny_llama, wait=False)  # returns as soon as the port is bound
    raw = Raw(server.endpoint)
    try:
        first = raw.check_health()
        assert first == NOT_SERVING, first
        assert raw.check_health(SERVICE_NAME) in (NOT_SERVING, SERVING)
        code, err, _ = raw.call("Info", pb.InfoRequest(), timeout=5)
        if code != OK:  # still loading: refused, marked for retry elsewhere
            assert code == UNAVAILABLE and retryable(err), err
        wait_for(lambda: raw.check_health() == SERVING, 60, "SERVING")
        assert raw.check_health(SERVICE_NAME) == SERVING
        assert raw.call("Score", score_req(), timeout=30)[0] == OK
    finally:
        raw.close()


def test_r13_sigterm_while_loading_exits_cleanly(server_factory, tiny_llama):
    server = server_factory(tiny_llama, "--grace-s", "5", wait=False)
    raw = Raw(server.endpoint)
    try:
        assert raw.check_health() == NOT_SERVING
        os.kill(server.pid, signal.SIGTERM)
        start = time.monotonic()
        rc = server.proc.wait(15)
        assert rc == 0, server.log()
        assert time.monotonic() - start < 5 + 0.5 + 5
    finally:
        raw.close()


@pytest.mark.slow
def test_r13_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_in_time(server_factory, slow_model):
    grace, drain = 20.0, 1.5
    server = server_factory(slow_model, "--grace-s", str(grace), "--drain-delay-s", str(drain))
    raw = Raw(server.endpoint)
    try:
        assert raw.call("Score", score_req(), timeout=30)[0] == OK  # connection up
        gen_thread, box = in_thread(raw.call, "Generate", gen_req(max_new_tokens=300, temperature=0.0), 120)
        time.sleep(0.5)
        assert gen_thread.is_alive(), box
        os.kill(server.pid, signal.SIGTERM)
        sigterm = time.monotonic()
        seen = []
        wait_for(lambda: seen.append(raw.check_health(timeout=1.0)) or seen[-1] == NOT_SERVING,
                 0.5, "NOT_SERVING", 0.01, probe=lambda: seen[-5:])
        assert raw.check_health(SERVICE_NAME) == NOT_SERVING
        code, err, _ = raw.call("Score", score_req(), timeout=10)
        assert code == UNAVAILABLE and retryable(err), err
        gen_thread.join(grace + 10)
        code, reply, _ = box[0]
        assert code == OK, reply  # the in-flight call finished
        g = reply.generations[0]
        assert g.finish_reason == "length" and len(g.token_ids.data) == 4 * 300
        code, err, _ = raw.call("Score", score_req(), timeout=10)
        assert code == UNAVAILABLE, err
        rc = server.proc.wait(grace + drain + 10)
        assert rc == 0, server.log()[-3000:]
        assert time.monotonic() - sigterm < grace + drain + 5
        assert "teacher: stopped" in server.log()
    finally:
        raw.close()


@pytest.mark.slow
def test_r13_grace_period_bounds_the_shutdown(server_factory, slow_model):
    grace, drain = 1.0, 0.2
    server = server_factory(slow_model, "--grace-s", str(grace), "--drain-delay-s", str(drain))
    raw = Raw(server.endpoint)
    try:
        assert raw.call("Score", score_req(), timeout=30)[0] == OK
        gen_thread, box = in_thread(raw.call, "Generate",
                                    gen_req(max_new_tokens=LONG_NEW_TOKENS, temperature=0.0), 120)
        time.sleep(0.5)
        os.kill(server.pid, signal.SIGTERM)
        sigterm = time.monotonic()
        rc = server.proc.wait(60)
        exited = time.monotonic() - sigterm
        assert rc == 0, server.log()[-3000:]
        assert exited < grace + drain + 4, f"exit took {exited:.1f}s with a {grace}s grace period"
        gen_thread.join(10)
        assert not gen_thread.is_alive()
        code, err, _ = box[0]
        assert code in (grpc.StatusCode.CANCELLED, UNAVAILABLE), err  # cut off, told so
    finally:
        raw.close()


# ------------------------------------------------------------------------ R-14 kill / restart
@pytest.mark.slow
def test_r14_kill_and_restart_client_with_shipped_retry_policy_sees_no_error(server_factory, tiny_llama):
    server = server_factory(tiny_llama)
    seq = list(range(20, 60))
    notices: list[str] = []
    # Default policy: 120 s deadline, backoff on UNAVAILABLE for as long; told once per waiting call.
    client = TeacherClient(server.endpoint, on_unavailable=notices.append)
    reference = client.score([seq], [10], top_k=5)[0]
    done: list[tuple[float, object]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop():
        for _ in range(5000):
            if stop.is_set():
                return
            try:
                done.append((time.monotonic(), client.score([seq], [10], top_k=5)[0]))
            except BaseException as exc:  # noqa: BLE001 - every error is a failure of the test
                errors.append(exc)
            time.sleep(0.01)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        wait_for(lambda: len(done) >= 5, 30, "calls before the kill")
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(10)

        # Meanwhile a worker with a short deadline, whose only teacher is dead, fails clearly.
        with TeacherClient(server.endpoint, timeout_s=2.0) as short:
            start = time.monotonic()
            with pytest.raises(TeacherUnavailable) as exc:
                short.score([seq], [10], top_k=5)
            assert time.monotonic() - start < 3.5
        msg = str(exc.value)
        assert msg.startswith(f"teacher unavailable at {server.endpoint} since ") and "UNAVAILABLE" in msg, msg
        assert int(re.search(r"after (\d+) attempt", msg).group(1)) >= 2, msg  # it did retry

        restarted = server_factory(tiny_llama, port=server.port)
        assert restarted.port == server.port
        back = time.monotonic()
        wait_for(lambda: sum(t > back for t, _ in done) >= 5, 60, "calls after the restart")
    finally:
        stop.set()
        worker.join(130)
        client.close()
    assert not worker.is_alive()
    assert not errors, errors
    assert len(notices) == 1 and notices[0].startswith(f"teacher unavailable at {server.endpoint}"), notices
    for _, got in done:  # same weights, same answers
        assert torch.equal(got.topk_ids, reference.topk_ids)
        torch.testing.assert_close(got.token_logprobs, reference.token_logprobs)


@pytest.mark.slow
def test_r14_worker_waiting_on_a_hung_teacher_fails_after_its_deadline(strict):
    server, raw, info = strict
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with TeacherClient(server.endpoint, timeout_s=2.0) as client:
            start = time.monotonic()
            with pytest.raises(TeacherUnavailable) as exc:
                client.score([PROMPT], [1], top_k=4)
            elapsed = time.monotonic() - start
        assert 1.9 < elapsed < 3.5, elapsed
        assert server.endpoint in str(exc.value) and "DEADLINE_EXCEEDED" in str(exc.value)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert_alive(server, raw)


# ----------------------------------------------------------------------------- R-16 bad input
V = 512  # vocabulary of tiny_llama (checked against Info in the fixture-using tests)
L = 512  # its max sequence length
TOPK_LIMIT, FULL_ROWS = 16, 64
f32 = lambda x: float(np.float32(x))  # noqa: E731

BAD_SCORE = {
    "no sequences": pb.ScoreRequest(top_k=4),
    "empty sequence": score_req([]),
    "id == vocab": score_req([1, 2, V]),
    "id >> vocab (int64)": score_req(ids_pb([1, 2, 1 << 40], pb.DTYPE_INT64)),
    "negative id": score_req([1, -1, 2]),
    "int32 min id": score_req([1, -(1 << 31), 2]),
    "score_from 0": score_req([1, 2, 3], score_from=[0]),
    "score_from negative": score_req([1, 2, 3], score_from=[-2]),
    "score_from > length": score_req([1, 2, 3], score_from=[4]),
    "score_from int32 max": score_req([1, 2, 3], score_from=[(1 << 31) - 1]),
    "negative shape dim": score_req(raw_tensor(pb.DTYPE_INT32, [-1], b"")),
    "negative dims product positive": score_req(raw_tensor(pb.DTYPE_INT32, [-1, -3], b"\0" * 12)),
    "bytes shorter than shape": score_req(raw_tensor(pb.DTYPE_INT32, [4], b"\1\0\0\0" * 3)),
    "bytes longer than shape": score_req(raw_tensor(pb.DTYPE_INT32, [2], b"\1\0\0\0" * 3)),
    "ragged bytes": score_req(raw_tensor(pb.DTYPE_INT32, [1], b"\1\0\0")),
    "float32 ids": score_req(ids_pb([1.0, 2.0, 3.0], pb.DTYPE_FLOAT32)),
    "float16 ids": score_req(raw_tensor(pb.DTYPE_FLOAT16, [2], b"\0\0\0\0")),
    "bfloat16 ids": score_req(raw_tensor(pb.DTYPE_BFLOAT16, [2], b"\0\0\0\0")),
    "unspecified dtype": score_req(raw_tensor(pb.DTYPE_UNSPECIFIED, [2], b"\0" * 8)),
    "unknown dtype enum": score_req(raw_tensor(99, [2], b"\0" * 8)),
    "2-D ids": score_req(ids_pb([[1, 2], [3, 4]])),
    "scalar ids": score_req(raw_tensor(pb.DTYPE_INT32, [], b"\1\0\0\0")),
    "empty shape huge dims": score_req(raw_tensor(pb.DTYPE_INT32, [1 << 62, 0], b"")),
    "65 dims": score_req(raw_tensor(pb.DTYPE_INT32, [1] * 65, b"\1\0\0\0")),
    "huge dims product": score_req(raw_tensor(pb.DTYPE_INT32, [1 << 62, 1 << 62], b"\0" * 8)),
    "over max length": score_req(list(np.arange(L + 1) % 100)),
    "too many sequences": score_req(*([[1, 2]] * 1025)),
    "temperature NaN": score_req(temperature=float("nan")),
    "temperature 0": score_req(temperature=0.0),
    "temperature negative": score_req(temperature=-1.0),
    "temperature -0": score_req(temperature=-0.0),
    "temperature inf": score_req(temperature=float("inf")),
    "temperature -inf": score_req(temperature=float("-inf")),
    "top_k over limit": score_req(top_k=TOPK_LIMIT + 1),
    "top_k int32 max": score_req(top_k=(1 << 31) - 1),
    "top_k negative": score_req(top_k=-1),
    "full rows over limit": score_req(list(range(40)), list(range(40)), score_from=[7, 7],
                                      return_full_logprobs=True),
    # 17 x 499 positions at top_k 16: a ~1.15 MB reply, over the 1 MiB message limit.
    "reply over the message limit": score_req(*[list(np.arange(500) % 100)] * 17, top_k=16),
}

BAD_GENERATE = {
    "no prompts": pb.GenerateRequest(max_new_tokens=4),
    "empty prompt": gen_req([]),
    "id == vocab": gen_req([1, V]),
    "negative id": gen_req([-5, 1]),
    "2-D prompt": gen_req(ids_pb([[1, 2], [3, 4]])),
    "float prompt": gen_req(ids_pb([1.0, 2.0], pb.DTYPE_FLOAT32)),
    "bytes not matching shape": gen_req(raw_tensor(pb.DTYPE_INT64, [3], b"\0" * 12)),
    "negative shape dim": gen_req(raw_tensor(pb.DTYPE_INT32, [-4], b"")),
    "empty shape huge dims": gen_req(raw_tensor(pb.DTYPE_INT32, [0, 1 << 62], b"")),
    "temperature NaN": gen_req(temperature=float("nan")),
    "temperature negative": gen_req(temperature=-0.5),
    "temperature inf": gen_req(temperature=float("inf")),
    "top_p 0": gen_req(top_p=0.0),
    "top_p > 1": gen_req(top_p=1.5),
    "top_p NaN": gen_req(top_p=float("nan")),
    "top_p negative": gen_req(top_p=-0.1),
    "top_p inf": gen_req(top_p=float("inf")),
    "max_new_tokens 0": gen_req(max_new_tokens=0),
    "max_new_tokens unset": pb.GenerateRequest(prompts=[ids_pb(PROMPT)]),
    "max_new_tokens negative": gen_req(max_new_tokens=-3),
    "max_new_tokens int32 max": gen_req(max_new_tokens=(1 << 31) - 1),
    "prompt + new over max length": gen_req(list(np.arange(500) % 100), max_new_tokens=L - 500 + 1),
    "prompt alone over max length": gen_req(list(np.arange(L + 1) % 100), max_new_tokens=1),
    "top_k over limit": gen_req(top_k=TOPK_LIMIT + 1),
    "top_k negative": gen_req(top_k=-1),
    "logprobs_top_k over limit": gen_req(logprobs_top_k=TOPK_LIMIT + 1),
    "logprobs_top_k negative": gen_req(logprobs_top_k=-2),
    "stop id == vocab": gen_req(stop_ids=[V]),
    "stop id negative": gen_req(stop_ids=[3, -1]),
    "too many prompts": gen_req(*([[1, 2]] * 1025)),
    "reply over the message limit": gen_req(*([[1, 2]] * 300), max_new_tokens=500,
                                            return_logprobs=True, logprobs_top_k=16),
}

# Valid, if unusual: must be answered (never INTERNAL) with finite numbers where they are defined.
EDGE_OK = {
    "score temperature tiny": ("Score", score_req(temperature=f32(1e-40))),
    "score temperature huge": ("Score", score_req(temperature=f32(3e38))),
    "score top_k 0": ("Score", score_req(top_k=0)),
    "score top_k at limit": ("Score", score_req(top_k=TOPK_LIMIT)),
    "score_from == length (0 positions)": ("Score", score_req([1, 2, 3], score_from=[3])),
    "score int64 ids, last id": ("Score", score_req(ids_pb([0, V - 1, 2], pb.DTYPE_INT64))),
    "score full max length": ("Score", score_req(list(np.arange(L) % V), score_from=[L - 1])),
    "score full rows at limit": ("Score", score_req(list(range(40)), list(range(40)), score_from=[8, 8],
                                                    return_full_logprobs=True)),
    "generate temperature tiny": ("Generate", gen_req(temperature=f32(1e-40), return_logprobs=True)),
    "generate temperature huge": ("Generate", gen_req(temperature=f32(3e38), return_logprobs=True)),
    "generate greedy": ("Generate", gen_req(temperature=0.0, return_logprobs=True, logprobs_top_k=3)),
    "generate top_p tiny": ("Generate", gen_req(top_p=f32(1e-30))),
    "generate top_k at limit": ("Generate", gen_req(top_k=TOPK_LIMIT, logprobs_top_k=TOPK_LIMIT)),
    "generate fills max length": ("Generate", gen_req(list(np.arange(L - 4) % 100), max_new_tokens=4)),
    "generate stop id last": ("Generate", gen_req(stop_ids=[V - 1, 0])),
    "generate seed uint64 max": ("Generate", gen_req(seed=(1 << 64) - 1)),
    "generate no seed": ("Generate", pb.GenerateRequest(prompts=[ids_pb(PROMPT)], max_new_tokens=2)),
}


def _assert_invalid(server, raw, method, request):
    code, err, _ = raw.call(method, request, timeout=30)
    assert code == INVALID, f"{code}: {getattr(err, 'details', lambda: '')()}"
    assert err.details(), "INVALID_ARGUMENT without a reason"
    assert server.proc.poll() is None


def test_r16_limits_match_the_cases(strict):
    _, _, info = strict
    assert (info.vocab_size, info.max_sequence_length, info.top_k_limit,
            info.max_full_row_positions) == (V, L, TOPK_LIMIT, FULL_ROWS)


@pytest.mark.parametrize("case", list(BAD_SCORE))
def test_r16_bad_score_is_invalid_argument(strict, case):
    server, raw, _ = strict
    _assert_invalid(server, raw, "Score", BAD_SCORE[case])


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_r16_bad_generate_is_invalid_argument(strict, case):
    server, raw, _ = strict
    _assert_invalid(server, raw, "Generate", BAD_GENERATE[case])


@pytest.mark.parametrize("case", list(EDGE_OK))
def test_r16_unusual_but_valid_requests_are_answered(strict, case):
    server, raw, _ = strict
    method, request = EDGE_OK[case]
    code, reply, _ = raw.call(method, request, timeout=60)
    assert code == OK, f"{code}: {getattr(reply, 'details', lambda: '')()}"
    tensors = ([t for s in reply.sequences for t in (s.topk_logprobs, s.token_logprobs)]
               if method == "Score" else [g.token_logprobs for g in reply.generations])
    for t in tensors:
        values = np.frombuffer(t.data, "<f4")
        assert not np.isnan(values).any(), f"NaN log-probs in {case}"
        assert (values <= 0).all()


def test_r16_server_survives_bad_input_and_never_answers_internal(strict):
    """After the bad requests above the server is alive, serving, and logged no internal error."""
    server, raw, _ = strict
    for name, req in BAD_SCORE.items():
        assert raw.call("Score", req, timeout=30)[0] == INVALID, name
    assert_alive(server, raw)
    assert raw.check_health() == SERVING
    assert "internal error" not in server.log()
    assert "Traceback" not in server.log()


_DTYPES = st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_INT32, pb.DTYPE_INT64, pb.DTYPE_FLOAT32,
                           pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, 7, -1])
_DIM = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, L, L + 1, 1 << 31, 1 << 62, -(1 << 62)]))
_INT32 = st.one_of(st.integers(-3, 20), st.sampled_from([V - 1, V, (1 << 31) - 1, -(1 << 31)]))
_NP_SIZES = {pb.DTYPE_INT32: "<i4", pb.DTYPE_INT64: "<i8", pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2"}


@st.composite
def _any_tensor(draw):
    dtype = draw(_DTYPES)
    shape = draw(st.lists(_DIM, max_size=3))
    count = math.prod(shape) if shape else 1
    if dtype in _NP_SIZES and 0 <= count <= 600 and draw(st.booleans()):
        values = draw(st.lists(st.integers(-3, V + 3), min_size=count, max_size=count))
        data = np.asarray(values).astype(_NP_SIZES[dtype]).tobytes()  # consistent with the shape
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def _plausible_sequence(draw):
    values = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=40))
    return pb.ScoreSequence(token_ids=ids_pb(values, draw(st.sampled_from([pb.DTYPE_INT32, pb.DTYPE_INT64]))),
                            score_from=draw(st.integers(1, len(values))))


@st.composite
def _score_requests(draw):
    """Mostly plausible requests with some fields broken, so both outcomes occur."""
    broken = st.builds(lambda t, f: pb.ScoreSequence(token_ids=t, score_from=f), _any_tensor(), _INT32)
    seqs = draw(st.lists(st.one_of(*[_plausible_sequence()] * 4, broken), max_size=3))
    req = pb.ScoreRequest(sequences=seqs, top_k=draw(st.integers(0, TOPK_LIMIT) | _INT32),
                          return_full_logprobs=draw(st.booleans()))
    temperature = draw(st.none() | st.floats(0.125, 4.0, width=32) | st.floats(width=32)
                       | st.sampled_from([0.0, -0.0, f32(1e-40), 1.0]))
    if temperature is not None:
        req.temperature = temperature
    return req


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(request=_score_requests())
def test_r16_fuzzed_score_requests_are_answered_or_invalid(strict, request):
    server, raw, _ = strict
    code, reply, _ = raw.call("Score", request, timeout=30)
    assert code in (OK, INVALID), f"{code}: {getattr(reply, 'details', lambda: '')()} for {request}"
    assert server.proc.poll() is None


# ------------------------------------------------------------------------- exit paths of serve
def _serve_until_exit(model_dir: Path, port: int = 0, timeout: float = 60.0):
    """Run `distillery teacher serve` expecting it to exit by itself; (code, output)."""
    cmd = [sys.executable, "-m", "services.cli", "teacher", "serve", "--model", str(model_dir),
           "--port", str(port), "--drain-delay-s", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"server did not exit within {timeout}s:\n{out.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace")


class _Booby:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_exit_model_dir_without_safetensors_is_refused_with_code_1(tiny_llama, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "unpickled"
    torch.save({"weights": _Booby(marker)}, model / "pytorch_model.bin")
    code, out = _serve_until_exit(model)
    assert code == 1, out
    assert "could not load the teacher model" in out
    assert "has no *.safetensors weights" in out
    assert not marker.exists(), "a pickle checkpoint was unpickled"


@pytest.mark.slow
def test_exit_missing_model_dir_is_refused_with_code_1(tmp_path):
    code, out = _serve_until_exit(tmp_path / "nowhere")
    assert code == 1, out
    assert "is not a model directory" in out


def test_exit_port_in_use_is_refused(strict, tiny_llama):
    """A second teacher on a taken port must fail, not silently share it with the first."""
    server, raw, _ = strict
    code, out = _serve_until_exit(tiny_llama, port=server.port, timeout=30)
    assert code != 0, out
    assert str(server.port) in out and "bind" in out.lower(), out
    assert_alive(server, raw)
