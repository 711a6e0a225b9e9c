"""TeacherClient's wait for an unavailable teacher (R-14), against in-process teacher servers on
127.0.0.1 sharing one loaded engine, so a stop and a start on the same port take milliseconds."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import torch

from teacher_server.client import TeacherClient
from teacher_server.contract import TeacherUnavailable
from teacher_server.engine import EngineConfig, TeacherEngine
from teacher_server.process import free_port
from teacher_server.serve import ServerConfig, TeacherServer

PROMPT = list(range(3, 11))
GIVEN_UP = re.compile(r"teacher unavailable at (?P<endpoints>.+) since (?P<since>\S+): no answer after "
                      r"(?P<attempts>\d+) attempt\(s\) in (?P<waited>[\d.]+)s \(last: (?P<code>[A-Z_]+): .*\)")


@pytest.fixture(scope="module")
def engine(tiny_llama) -> TeacherEngine:
    return TeacherEngine.load(EngineConfig(model_dir=str(tiny_llama)))


def serve(engine: TeacherEngine, port: int = 0) -> TeacherServer:
    server = TeacherServer(ServerConfig(engine=engine.config, port=port, grace_s=1.0, drain_delay_s=0.0))
    server.start()
    server.load(engine)
    return server


def test_r14_a_teacher_back_within_the_unavailable_budget_answers_the_waiting_call(engine):
    server = serve(engine)
    endpoint = f"127.0.0.1:{server.port}"
    notices: list[str] = []
    started: list[TeacherServer] = []
    # The outage (2.5 s) outlasts the call's deadline (1 s): only the unavailable budget bounds it.
    with TeacherClient(endpoint, timeout_s=1.0, unavailable_timeout_s=30.0,
                       on_unavailable=notices.append) as client:
        want = client.score([PROMPT], [1], top_k=4)[0]
        server.stop()
        restart = threading.Timer(2.5, lambda: started.append(serve(engine, server.port)))
        restart.start()
        t0 = time.monotonic()
        try:
            got = client.score([PROMPT], [1], top_k=4)[0]
            elapsed = time.monotonic() - t0
        finally:
            restart.join()
            for s in started:
                s.stop()
    assert 2.5 <= elapsed < 8.0, elapsed
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.token_logprobs, want.token_logprobs)
    assert len(notices) == 1 and notices[0].startswith(f"teacher unavailable at {endpoint} since "), notices
    assert "retrying for up to 30s" in notices[0]


def test_r14_a_teacher_gone_for_good_fails_after_the_budget_naming_endpoints_and_time(engine):
    server = serve(engine)
    endpoints = [f"127.0.0.1:{server.port}", f"127.0.0.1:{free_port()}"]  # the second never listened
    with TeacherClient(endpoints, timeout_s=0.5, unavailable_timeout_s=2.0) as client:
        client.info()
        server.stop()
        before = datetime.now(timezone.utc)
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable) as exc:
            client.score([PROMPT], [1], top_k=4)
        elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed < 3.0, elapsed  # the budget, not the 0.5 s deadline, and not much past it
    got = GIVEN_UP.fullmatch(str(exc.value))
    assert got, str(exc.value)
    assert got["endpoints"] == ", ".join(endpoints) and got["code"] == "UNAVAILABLE"
    assert int(got["attempts"]) >= 3 and float(got["waited"]) >= 2.0
    since = datetime.fromisoformat(got["since"])
    assert since.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=0.01) <= since <= before + timedelta(seconds=0.5), (before, since)
