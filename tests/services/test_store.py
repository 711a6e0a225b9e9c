"""JobStore against a real Redis: records, the queue and its attempt fence, transitions and their
fences, cancel, leases, takeover, resume, waiting notes and events. Each test has its own key
prefix (conftest's redis_prefix); the scheduler's use of all this is tests/services/test_scheduler.py."""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from services.store import (
    STATES,
    JobNotFound,
    JobStore,
    StoreUnavailable,
    TransitionRefused,
)
from teacher_server.process import free_port

SPEC = {"name": "s", "distill": {"steps": 3}}


@pytest.fixture
def store(redis_url, redis_prefix) -> Iterator[JobStore]:
    s = JobStore(redis_url, redis_prefix, max_events=100)
    yield s
    s.r.close()


def claimed(store: JobStore, owner: str = "sched-a", lease_s: float = 30) -> list:
    """(job, attempt) of every job the queue hands `owner` now."""
    return [got for entry in store.read_queue(owner, lease_s)
            if (got := store.claim_entry(entry, owner, lease_s)) is not None]


def states(store: JobStore, job_id: str) -> list[tuple[str, str]]:
    return [(e["previous"], e["state"]) for _, e in store.events(job_id) if e["kind"] == "state"]


def test_create_get_and_idempotency(store):
    job_id, created = store.create(SPEC, name="my-job")
    assert created and job_id.startswith("my-job-")
    job = store.get(job_id)
    assert (job.id, job.state, job.attempt, job.spec, job.name) == (job_id, "queued", 0, SPEC, "my-job")
    assert job.created_at == job.updated_at > 0 and job.failures == 0 and job.resumes == 0
    # The same idempotency key gives the job it created, not a new one; another key a new one.
    first, _ = store.create(SPEC, name="idem", idempotency_key="k1")
    assert store.create({"other": 1}, name="idem", idempotency_key="k1") == (first, False)
    assert store.create(SPEC, name="idem", idempotency_key="k2")[1]
    with pytest.raises(JobNotFound):
        store.get("no-such-job")


def test_list_is_newest_first_with_state_filter_and_paging(store):
    ids = []
    for i in range(5):
        ids.append(store.create(SPEC, name=f"j{i}")[0])
        time.sleep(0.002)  # distinct creation times
    store.transition(ids[1], allowed=("queued",), to="cancelled")
    assert [j.id for j in store.list()] == ids[::-1]
    assert [j.id for j in store.list(limit=2, offset=1)] == [ids[3], ids[2]]
    assert [j.id for j in store.list(state="cancelled")] == [ids[1]]
    assert [j.id for j in store.list(state="queued", offset=3)] == [ids[0]]
    assert store.count_by_state() == {**dict.fromkeys(STATES, 0), "queued": 4, "cancelled": 1}


def test_a_claim_starts_the_job_under_a_lease_once(store):
    job_id, _ = store.create(SPEC, name="q")
    entries = store.read_queue("sched-a", 30)
    assert [(e.job_id, e.attempt) for e in entries] == [(job_id, 0)]
    job, attempt = store.claim_entry(entries[0], "sched-a", 30)
    assert attempt == 1 and (job.state, job.attempt, job.owner) == ("starting", 1, "sched-a")
    assert store.active_ids() == [job_id] and store.lapsed_ids() == []
    assert store.r.get(store.k.lease(job_id)) == b"sched-a:1"
    # The entry is settled: nobody reads it again, and a replay of it no longer claims.
    assert store.read_queue("sched-b", 30) == []
    assert store.claim_entry(entries[0], "sched-b", 30) is None
    assert store.get(job_id).owner == "sched-a"


def test_an_entry_a_dead_reader_left_is_taken_over_after_a_lease(store):
    job_id, _ = store.create(SPEC, name="q")
    assert [e.job_id for e in store.read_queue("dead", 0.05)] == [job_id]  # read, never claimed
    assert store.read_queue("sched-b", 30) == []  # pending on its reader, not idle long enough
    time.sleep(0.1)
    [(job, attempt)] = claimed(store, "sched-b", lease_s=0.05)
    assert (job.id, attempt, job.owner) == (job_id, 1, "sched-b")


def test_transitions_check_state_attempt_and_owner(store):
    job_id, _ = store.create(SPEC, name="t")
    claimed(store)
    with pytest.raises(TransitionRefused, match="state:starting"):
        store.transition(job_id, allowed=("running",), to="succeeded")
    with pytest.raises(TransitionRefused, match="attempt:1"):
        store.transition(job_id, allowed=("starting",), to="running", attempt=0)  # a stale attempt
    with pytest.raises(TransitionRefused, match="owner"):
        store.transition(job_id, allowed=("starting",), to="running", owner="sched-b")
    assert store.transition(job_id, allowed=("starting",), to="running", attempt=1, owner="sched-a",
                            submission_id="ray-1") == "starting"
    # A write that keeps the state: fields are stored (dicts as JSON), no state event.
    store.transition(job_id, allowed=("running",), to="running", quiet=True, progress={"step": 2})
    assert store.get(job_id).progress == {"step": 2} and store.get(job_id).submission_id == "ray-1"
    assert store.transition(job_id, allowed=("running",), to="succeeded", summary={"loss": 0.5}) == "running"
    job = store.get(job_id)
    assert (job.state, job.summary) == ("succeeded", {"loss": 0.5})
    # The end releases the lease and the active set; the events tell the whole path in order.
    assert store.active_ids() == [] and store.r.exists(store.k.lease(job_id)) == 0
    assert states(store, job_id) == [("starting", "running"), ("running", "succeeded")]  # a claim writes none
    with pytest.raises(JobNotFound):
        store.transition("no-such-job", allowed=("queued",), to="running")


def test_request_cancel_by_state(store):
    queued, _ = store.create(SPEC, name="c1")
    assert store.request_cancel(queued) == "cancelled"
    assert store.get(queued).reason == "cancelled_by_user"
    running, _ = store.create(SPEC, name="c2")
    assert [job.id for job, _ in claimed(store)] == [running]  # the cancelled job's entry claims nothing
    store.transition(running, allowed=("starting",), to="running")
    assert store.request_cancel(running) == "cancelling"
    assert store.request_cancel(running) == "cancelling"  # asked twice: no change
    store.transition(running, allowed=("cancelling",), to="cancelled")
    assert store.request_cancel(running) == "cancelled"  # an ended job stays as it is


def test_leases_renew_lapse_and_reclaim(store):
    requeued, _ = store.create(SPEC, name="l1")
    cancelling, _ = store.create(SPEC, name="l2")
    got = dict((job.id, attempt) for job, attempt in claimed(store, lease_s=0.2))
    assert got == {requeued: 1, cancelling: 1}
    assert store.renew_lease(requeued, "sched-a", 1, 0.2)
    assert not store.renew_lease(requeued, "sched-b", 1, 0.2) and not store.renew_lease(requeued, "sched-a", 0, 0.2)
    store.request_cancel(cancelling)
    time.sleep(0.3)
    assert sorted(store.lapsed_ids()) == sorted([requeued, cancelling])
    assert sorted(store.reclaim_expired()) == sorted([requeued, cancelling])
    job = store.get(requeued)
    assert (job.state, job.attempt, job.owner, job.failures) == ("queued", 1, "", 1)
    assert store.get(cancelling).state == "cancelled"  # it was being cancelled: it ends
    assert store.active_ids() == [] and not store.reclaim(requeued)  # nothing left to reclaim
    # Back in the queue for the attempt it had; the next claim makes attempt 2.
    [(job, attempt)] = claimed(store, "sched-b")
    assert (job.id, attempt) == (requeued, 2)
    lapsed = [e for _, e in store.events(requeued) if e.get("reason") == "lease_lapsed"]
    assert [(e["previous"], e["state"]) for e in lapsed] == [("starting", "queued")]


def test_adopt_takes_over_a_lapsed_lease_of_a_live_submission(store):
    job_id, _ = store.create(SPEC, name="a")
    claimed(store, lease_s=0.1)
    store.transition(job_id, allowed=("starting",), to="running", submission_id="ray-7")
    assert not store.adopt(job_id, attempt=1, submission_id="ray-7", owner="sched-b", lease_s=30)  # still leased
    time.sleep(0.2)
    assert not store.adopt(job_id, attempt=1, submission_id="ray-other", owner="sched-b", lease_s=30)
    assert not store.adopt(job_id, attempt=2, submission_id="ray-7", owner="sched-b", lease_s=30)
    assert store.adopt(job_id, attempt=1, submission_id="ray-7", owner="sched-b", lease_s=30)
    job = store.get(job_id)
    assert (job.state, job.attempt, job.owner) == ("running", 1, "sched-b")
    assert store.renew_lease(job_id, "sched-b", 1, 30) and store.lapsed_ids() == []
    [adopted] = [e for _, e in store.events(job_id) if e["kind"] == "adopted"]
    assert (adopted["owner"], adopted["previous_owner"], adopted["submission_id"]) == ("sched-b", "sched-a", "ray-7")


def test_resume_requeues_a_failed_or_cancelled_job_only(store):
    job_id, _ = store.create(SPEC, name="r")
    claimed(store)
    with pytest.raises(TransitionRefused, match="only a failed or cancelled job resumes"):
        store.resume(job_id)
    store.transition(job_id, allowed=("starting",), to="failed", error="boom", reason="worker")
    assert store.resume(job_id) == "failed"
    job = store.get(job_id)
    assert (job.state, job.error, job.reason, job.resumes, job.attempt) == ("queued", "", "", 1, 1)
    [(job, attempt)] = claimed(store, "sched-b")
    assert (job.id, attempt) == (job_id, 2)
    with pytest.raises(JobNotFound):
        store.resume("no-such-job")


def test_waiting_notes_are_for_queued_jobs_and_say_when_they_change(store):
    job_id, _ = store.create(SPEC, name="w")
    assert store.note_waiting(job_id, "waiting for 4 CPUs")
    assert not store.note_waiting(job_id, "waiting for 4 CPUs")
    assert store.get(job_id).waiting == "waiting for 4 CPUs"
    claimed(store)
    assert store.get(job_id).waiting == ""  # a claim clears it
    assert not store.note_waiting(job_id, "late note")


def test_events_read_after_a_cursor_and_skip_unreadable_entries(store):
    job_id, _ = store.create(SPEC, name="e")
    claimed(store)
    store.transition(job_id, allowed=("starting",), to="running")
    store.r.xadd(store.k.events(job_id), {"event": b"not json"})
    store.r.xadd(store.k.events(job_id), {"other": b"{}"})
    store.transition(job_id, allowed=("running",), to="succeeded")
    events = store.events(job_id)
    assert [e["state"] for _, e in events] == ["running", "succeeded"]
    assert events[0][1]["attempt"] == 1 and events[0][1]["time"] > 0
    assert store.events(job_id, after=events[0][0]) == events[1:]
    assert store.events(job_id, after=events[1][0], block_ms=50) == []


def test_a_corrupt_record_stays_readable(store):
    job_id, _ = store.create(SPEC, name="x")
    store.r.hset(store.k.job(job_id), mapping={"spec": b"{\xff not json", "progress": b"[1, 2]"})
    job = store.get(job_id)
    assert job.spec == {"unreadable": "{\ufffd not json"} and job.progress == {"value": [1, 2]}


def test_an_unreachable_redis_is_store_unavailable():
    store = JobStore(f"redis://127.0.0.1:{free_port()}/0", "nobody")
    assert not store.ping()
    with pytest.raises(StoreUnavailable):
        store.get("any")
    with pytest.raises(StoreUnavailable):
        store.create(SPEC, name="x")
