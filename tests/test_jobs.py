"""Job state machine on SQLite and PostgreSQL: allowed transitions, compare-and-set, sweeper recovery."""

from __future__ import annotations

from datetime import timedelta

import pytest

from db import jobs
from db.jobs import TRANSITIONS, IllegalTransition, NewJob
from db.models import FailStage, Job, JobState, utcnow
from db.records import complete_stable, record_instance
from tests.test_records import rec


def _series(sessionmaker, series="1.2.3.1") -> int:
    t0 = utcnow() - timedelta(seconds=10)
    with sessionmaker.begin() as s:
        record_instance(s, rec(f"{series}.1", series=series), t0)
        complete_stable(s, utcnow(), 2)
    with sessionmaker() as s:
        return jobs.series_to_route(s)[-1]


def _job(sessionmaker, plugin="p1") -> int:
    sid = _series(sessionmaker)
    with sessionmaker.begin() as s:
        [job_id] = jobs.create_jobs(s, sid, [NewJob(plugin, "1.0", "r", "cpu", "routine")], utcnow())
    return job_id


def _state(sessionmaker, job_id) -> Job:
    with sessionmaker() as s:
        return s.get(Job, job_id)


def test_transition_table_is_closed_and_reaches_every_state():
    reachable, frontier = {JobState.QUEUED}, [JobState.QUEUED]
    while frontier:
        for dst in TRANSITIONS[frontier.pop()] - reachable:
            reachable.add(dst)
            frontier.append(dst)
    assert reachable == set(JobState)
    assert set(TRANSITIONS) == set(JobState)


def test_happy_path_sets_stage_timestamps(sessionmaker):
    job_id = _job(sessionmaker)
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w1")
    with sessionmaker.begin() as s:
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, warnings=["w"])
    job = _state(sessionmaker, job_id)
    assert (job.state, job.attempts, job.worker, job.warnings) == ("encoded", 1, "w1", ["w"])
    assert job.queued_at <= job.started_at <= job.encoded_at


def test_compare_and_set_loses_quietly(sessionmaker):
    job_id = _job(sessionmaker)
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w1") is True
    with sessionmaker.begin() as s:  # a redelivered task finds the job already running
        assert jobs.start(s, job_id, "w2") is False
    assert _state(sessionmaker, job_id).worker == "w1"


@pytest.mark.parametrize(
    "src,dst",
    [(JobState.QUEUED, JobState.ENCODED), (JobState.QUEUED, JobState.DELIVERED), (JobState.FAILED, JobState.RUNNING),
     (JobState.SKIPPED, JobState.ENCODED), (JobState.DELIVERED, JobState.FAILED)],
)
def test_illegal_transitions_raise(sessionmaker, src, dst):
    job_id = _job(sessionmaker)
    with sessionmaker.begin() as s, pytest.raises(IllegalTransition, match=f"{src} -> {dst}"):
        jobs.transition(s, job_id, src, dst)


def test_one_job_per_series_and_plugin(sessionmaker):
    sid = _series(sessionmaker)
    new = [NewJob("p1", "1.0", "r1", "cpu", "routine"), NewJob("p2", "1.0", "r1", "gpu", "stat")]
    with sessionmaker.begin() as s:
        assert len(jobs.create_jobs(s, sid, new, utcnow())) == 2
    with sessionmaker.begin() as s:
        assert jobs.create_jobs(s, sid, new, utcnow()) == []
    with sessionmaker() as s:
        assert [j["plugin"] for j in jobs.list_jobs(s)] == ["p2", "p1"]


def test_fail_skip_and_retry(sessionmaker):
    job_id = _job(sessionmaker)
    with sessionmaker.begin() as s:
        jobs.start(s, job_id, "w1")
        assert jobs.fail(s, job_id, JobState.RUNNING, FailStage.INFER, "boom")
    with sessionmaker() as s:
        [j] = jobs.list_jobs(s)
    assert (j["state"], j["fail_stage"], j["error"], j["attempts"]) == ("failed", "infer", "boom", 1)
    with sessionmaker.begin() as s:
        assert jobs.requeue(s, job_id) is True
        assert jobs.requeue(s, job_id) is False  # already queued
    job = _state(sessionmaker, job_id)
    assert (job.state, job.attempts, job.reason, job.fail_stage) == ("queued", 0, None, None)
    with sessionmaker.begin() as s:
        assert jobs.skip(s, job_id, JobState.QUEUED, "model unavailable")
    with sessionmaker.begin() as s, pytest.raises(LookupError):
        jobs.requeue(s, 999999)


def test_sweeper_requeues_lost_runs_then_gives_up(sessionmaker):
    job_id = _job(sessionmaker)
    t0 = utcnow()
    with sessionmaker.begin() as s:  # never enqueued: due at once
        r = jobs.recover_lost(s, t0, lost_seconds=5, resend_seconds=60, max_attempts=2)
        assert [e[0] for e in r.enqueue] == [job_id]
        jobs.mark_enqueued(s, [job_id], t0)
    with sessionmaker.begin() as s:  # enqueued, not yet due again
        assert jobs.recover_lost(s, t0 + timedelta(seconds=30), lost_seconds=5, resend_seconds=60,
                                 max_attempts=2).enqueue == []
    with sessionmaker.begin() as s:  # lost message: resent after resend_seconds
        assert jobs.recover_lost(s, t0 + timedelta(seconds=61), lost_seconds=5, resend_seconds=60,
                                 max_attempts=2).enqueue
    for attempt in (1, 2):
        with sessionmaker.begin() as s:
            assert jobs.start(s, job_id, f"w{attempt}", now=t0)
        with sessionmaker.begin() as s:  # alive: heartbeat is fresh
            assert jobs.heartbeat(s, job_id, t0 + timedelta(seconds=3))
            r = jobs.recover_lost(s, t0 + timedelta(seconds=4), lost_seconds=5, resend_seconds=60, max_attempts=2)
            assert r.requeued == [] and r.failed == []
        with sessionmaker.begin() as s:  # worker killed: no heartbeat for longer than lost_seconds
            r = jobs.recover_lost(s, t0 + timedelta(seconds=20), lost_seconds=5, resend_seconds=60, max_attempts=2)
        if attempt == 1:
            assert r.requeued == [job_id] and [e[0] for e in r.enqueue] == [job_id]
        else:
            assert r.failed == [job_id]
    job = _state(sessionmaker, job_id)
    assert (job.state, job.fail_stage, job.attempts) == ("failed", "infer", 2)
    assert "worker lost" in job.reason
    with sessionmaker.begin() as s:
        assert jobs.heartbeat(s, job_id) is False


def test_routing_marks_series_once(sessionmaker):
    sid = _series(sessionmaker)
    with sessionmaker.begin() as s:
        assert jobs.mark_routed(s, sid, "no rule matched", utcnow())
    with sessionmaker.begin() as s:
        assert jobs.mark_routed(s, sid, "again", utcnow()) is False
        assert jobs.series_to_route(s) == []
