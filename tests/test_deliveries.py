"""Delivery rows on SQLite and PostgreSQL: claim (compare-and-set), backoff, cap, settle, sweeper, redeliver."""

from __future__ import annotations

from datetime import timedelta

import pytest

from db import deliveries, jobs
from db.models import Delivery, Job, JobState, utcnow
from tests.test_jobs import _job, _state

RETRY = dict(max_attempts=3, base=10.0, cap=25.0)


def _encoded(sessionmaker, destinations=("pacs",), plugin="p1") -> tuple[int, list[int]]:
    job_id = _job(sessionmaker, plugin)
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w1")
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        ids = deliveries.prepare(s, job_id, list(destinations), utcnow())
    return job_id, ids


def _delivery(sessionmaker, delivery_id) -> Delivery:
    with sessionmaker() as s:
        return s.get(Delivery, delivery_id)


def test_backoff_doubles_up_to_the_cap():
    assert [deliveries.backoff(n, 10, 100) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]


def test_success_on_every_destination_delivers_the_job(sessionmaker):
    job_id, (a, b) = _encoded(sessionmaker, ["pacs", "backup"])
    now = utcnow()
    with sessionmaker.begin() as s:
        ca = deliveries.claim(s, a, now)
        assert deliveries.claim(s, a, now) is None  # a duplicate task finds it held
        assert deliveries.succeeded(s, ca, 3, now) is None  # backup still pending
    assert _state(sessionmaker, job_id).state == JobState.ENCODED
    with sessionmaker.begin() as s:
        assert deliveries.succeeded(s, deliveries.claim(s, b, now), 3, now) == JobState.DELIVERED
    job = _state(sessionmaker, job_id)
    assert job.state == JobState.DELIVERED and job.delivered_at is not None
    assert (_delivery(sessionmaker, a).state, _delivery(sessionmaker, a).instances) == ("sent", 3)
    with sessionmaker.begin() as s:  # settled: a late duplicate does nothing
        assert deliveries.claim(s, a, now) is None


def test_failures_back_off_then_fail_the_job_at_the_cap(sessionmaker):
    job_id, (d,) = _encoded(sessionmaker)
    now = utcnow()
    for attempt, wait in ((1, 10), (2, 20)):
        with sessionmaker.begin() as s:
            c = deliveries.claim(s, d, now)
            assert c.attempt == attempt
            assert deliveries.attempt_failed(s, c, "connection refused", now, **RETRY) == ("retry", None)
        row = _delivery(sessionmaker, d)
        assert (row.state, row.last_error, row.started_at) == ("pending", "connection refused", None)
        assert row.next_attempt_at == now + timedelta(seconds=wait)
        with sessionmaker.begin() as s:  # not due yet (beyond the allowed clock skew)
            assert deliveries.claim(s, d, now + timedelta(seconds=wait) - deliveries.CLOCK_SKEW
                                    - timedelta(seconds=1)) is None
        now += timedelta(seconds=wait)
    with sessionmaker.begin() as s:
        c = deliveries.claim(s, d, now)
        assert deliveries.attempt_failed(s, c, "connection refused", now, **RETRY) == ("failed", JobState.FAILED)
    job = _state(sessionmaker, job_id)
    assert (job.state, job.fail_stage) == ("failed", "dispatch")
    assert job.reason == "delivery to pacs failed after 3 attempt(s): connection refused"
    with sessionmaker() as s:
        [row] = jobs.list_jobs(s)
    assert row["deliveries"][0] | {"id": 0} == {
        "id": 0, "destination": "pacs", "state": "failed", "attempts": 3, "last_error": "connection refused",
        "instances": None, "next_attempt_at": None, "sent_at": None,
    }


def test_a_permanent_error_fails_at_once(sessionmaker):
    job_id, (d,) = _encoded(sessionmaker)
    with sessionmaker.begin() as s:
        c = deliveries.claim(s, d, utcnow())
        assert deliveries.attempt_failed(s, c, "unknown peer", utcnow(), permanent=True, **RETRY)[0] == "failed"
    assert _state(sessionmaker, job_id).state == JobState.FAILED


def test_one_failed_destination_fails_the_job_only_once_all_settle(sessionmaker):
    job_id, (a, b) = _encoded(sessionmaker, ["pacs", "backup"])
    now = utcnow()
    with sessionmaker.begin() as s:
        assert deliveries.attempt_failed(s, deliveries.claim(s, a, now), "refused", now, permanent=True, **RETRY) \
            == ("failed", None)
    assert _state(sessionmaker, job_id).state == JobState.ENCODED  # backup still pending
    with sessionmaker.begin() as s:
        assert deliveries.succeeded(s, deliveries.claim(s, b, now), 1, now) == JobState.FAILED
    assert "delivery to pacs failed" in _state(sessionmaker, job_id).reason


def test_sweeper_sends_due_deliveries_and_releases_lost_attempts(sessionmaker):
    job_id, (d,) = _encoded(sessionmaker)
    now = utcnow()
    kw = dict(resend_seconds=600, lost_seconds=60, max_attempts=3)
    with sessionmaker.begin() as s:
        assert deliveries.due(s, now, **kw) == ([d], [])
        deliveries.mark_enqueued(s, [d], now)
    with sessionmaker.begin() as s:  # sent to the broker: not again until the resend period passes
        assert deliveries.due(s, now + timedelta(seconds=599), **kw) == ([], [])
        assert deliveries.due(s, now + timedelta(seconds=601), **kw) == ([d], [])
        assert deliveries.claim(s, d, now) is not None
    with sessionmaker.begin() as s:  # held and alive: left alone; silent past lost_seconds: released
        assert deliveries.due(s, now + timedelta(seconds=30), **kw) == ([], [])
    later = now + timedelta(seconds=61)
    with sessionmaker.begin() as s:
        assert deliveries.due(s, later, **kw) == ([d], [d])
    row = _delivery(sessionmaker, d)
    assert (row.state, row.attempts, row.started_at) == ("pending", 1, None)
    assert "worker lost" in row.last_error


def test_sweeper_settles_a_job_left_behind(sessionmaker):
    """A job still encoded although all its deliveries have settled (a safety net): the sweeper settles it."""
    from sqlalchemy import update

    job_id, (a, b) = _encoded(sessionmaker, ["pacs", "backup"])
    with sessionmaker.begin() as s:
        s.execute(update(Delivery).where(Delivery.job_id == job_id).values(state="sent"))
    assert _state(sessionmaker, job_id).state == JobState.ENCODED
    with sessionmaker.begin() as s:
        assert deliveries.due(s, utcnow(), resend_seconds=600, lost_seconds=60, max_attempts=3) == ([], [])
    assert _state(sessionmaker, job_id).state == JobState.DELIVERED


def test_job_retry_parks_deliveries_until_encoded_again(sessionmaker):
    job_id, (d,) = _encoded(sessionmaker)
    with sessionmaker.begin() as s:
        assert jobs.requeue(s, job_id)
    with sessionmaker.begin() as s:
        assert deliveries.due(s, utcnow(), resend_seconds=600, lost_seconds=60, max_attempts=3) == ([], [])
        assert deliveries.claim(s, d, utcnow()) is None
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w2")
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        assert deliveries.prepare(s, job_id, ["pacs"], utcnow()) == [d]  # the same row, fresh
    assert _delivery(sessionmaker, d).attempts == 0


def test_redeliver(sessionmaker):
    job_id, (a, b) = _encoded(sessionmaker, ["pacs", "backup"])
    now = utcnow()
    with sessionmaker.begin() as s:
        deliveries.succeeded(s, deliveries.claim(s, a, now), 1, now)
        deliveries.attempt_failed(s, deliveries.claim(s, b, now), "down", now, permanent=True, **RETRY)
    assert _state(sessionmaker, job_id).state == JobState.FAILED
    with sessionmaker.begin() as s:
        assert deliveries.redeliver(s, job_id, now) == [b]  # only the failed one
    job = _state(sessionmaker, job_id)
    assert (job.state, job.reason, job.fail_stage) == ("encoded", None, None)
    with sessionmaker.begin() as s:
        assert deliveries.succeeded(s, deliveries.claim(s, b, now), 1, now) == JobState.DELIVERED
    with sessionmaker.begin() as s, pytest.raises(deliveries.NotRedeliverable, match="--all"):
        deliveries.redeliver(s, job_id, now)
    with sessionmaker.begin() as s:
        assert sorted(deliveries.redeliver(s, job_id, now, everything=True)) == sorted([a, b])
    assert _state(sessionmaker, job_id).state == JobState.ENCODED


def test_redeliver_refuses_what_has_no_results(sessionmaker):
    job_id = _job(sessionmaker)
    with sessionmaker.begin() as s, pytest.raises(deliveries.NotRedeliverable, match="not written yet"):
        deliveries.redeliver(s, job_id, utcnow())
    with sessionmaker.begin() as s:
        jobs.skip(s, job_id, JobState.QUEUED, "model unavailable")
    with sessionmaker.begin() as s, pytest.raises(deliveries.NotRedeliverable, match="jobs retry"):
        deliveries.redeliver(s, job_id, utcnow())
    with sessionmaker.begin() as s, pytest.raises(LookupError):
        deliveries.redeliver(s, 999_999, utcnow())
    enc, _ = _encoded(sessionmaker, [], plugin="p2")
    with sessionmaker.begin() as s, pytest.raises(deliveries.NotRedeliverable, match="no destinations"):
        deliveries.redeliver(s, enc, utcnow())


def test_expired_outputs(sessionmaker):
    delivered, (d,) = _encoded(sessionmaker, ["pacs"])
    now = utcnow()
    with sessionmaker.begin() as s:
        deliveries.succeeded(s, deliveries.claim(s, d, now), 1, now)
    pending, _ = _encoded(sessionmaker, ["pacs"], plugin="p2")
    with sessionmaker() as s:
        assert jobs.expired_outputs(s, now) == []
        assert jobs.expired_outputs(s, utcnow() + timedelta(seconds=1)) == [delivered]  # pending one is kept
    with sessionmaker.begin() as s:
        jobs.mark_outputs_removed(s, delivered, now)
    with sessionmaker.begin() as s, pytest.raises(deliveries.NotRedeliverable, match="retention"):
        deliveries.redeliver(s, delivered, now, everything=True)
    with sessionmaker.begin() as s:
        assert jobs.requeue(s, delivered)  # a retry writes them again
    assert _state(sessionmaker, delivered).outputs_removed_at is None
    with sessionmaker() as s:
        assert s.get(Job, pending).state == JobState.ENCODED


def test_sweeper_removes_outputs_after_the_retention(sessionmaker, tmp_path):
    from node.queueing.sweeper import Sweeper
    from node.settings import Settings

    settings = Settings(data_dir=tmp_path, output_retention_days=2)
    job_id, (d,) = _encoded(sessionmaker, ["pacs"])
    with sessionmaker.begin() as s:
        deliveries.succeeded(s, deliveries.claim(s, d, utcnow()), 1, utcnow())
    folder = settings.outputs_dir / str(job_id)
    folder.mkdir(parents=True)
    (folder / "SR.dcm").write_bytes(b"x")
    sweeper = Sweeper(sessionmaker, enqueuer=None, settings=settings)
    assert sweeper.purge_outputs(utcnow() + timedelta(days=1)) == []
    assert folder.is_dir()
    assert sweeper.purge_outputs(utcnow() + timedelta(days=2, seconds=1)) == [job_id]
    assert not folder.exists() and _state(sessionmaker, job_id).outputs_removed_at is not None
    assert sweeper.purge_outputs(utcnow() + timedelta(days=3)) == []  # once
    forever = Sweeper(sessionmaker, enqueuer=None, settings=Settings(data_dir=tmp_path, output_retention_days=0))
    assert forever.purge_outputs(utcnow() + timedelta(days=999)) == []


def test_a_triage_flag_goes_ahead_and_never_holds_the_results(sessionmaker):
    """A flag row (`ris:flag`) is claimable while the job still encodes, survives the results' prepare, and never
    decides the job's state: results sent -> delivered, and a flag still waiting is closed as moot."""
    job_id = _job(sessionmaker)
    now = utcnow()
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w1")
        [flag] = deliveries.prepare_flags(s, job_id, ["ris"], now)
    with sessionmaker.begin() as s:
        c = deliveries.claim(s, flag, now)  # the job is running: a flag may go
        assert c is not None and c.destination == "ris:flag" and deliveries.flag_of(c.destination) == "ris"
        assert deliveries.succeeded(s, c, 1, now) is None  # the job is not settled by its flag
    with sessionmaker.begin() as s:
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        ids = deliveries.prepare(s, job_id, ["ris", "pacs"], now)
    assert flag not in ids and _delivery(sessionmaker, flag).state == "sent"  # kept as it was
    ris, pacs = ids
    with sessionmaker.begin() as s:
        assert not deliveries.results_sent(s, job_id, "ris")
        assert deliveries.succeeded(s, deliveries.claim(s, ris, now), 1, now) is None
        assert deliveries.results_sent(s, job_id, "ris")
        assert deliveries.succeeded(s, deliveries.claim(s, pacs, now), 3, now) == JobState.DELIVERED

    # a second job: its flag failed for good -> the job is still delivered by its results
    job2 = _job(sessionmaker, "p2")
    with sessionmaker.begin() as s:
        assert jobs.start(s, job2, "w1")
        [flag2] = deliveries.prepare_flags(s, job2, ["ris"], now)
        assert deliveries.attempt_failed(s, deliveries.claim(s, flag2, now), "AR", now, permanent=True,
                                         **RETRY) == ("failed", None)
        assert jobs.transition(s, job2, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        [ris2] = deliveries.prepare(s, job2, ["ris"], now)
        assert deliveries.succeeded(s, deliveries.claim(s, ris2, now), 1, now) == JobState.DELIVERED
    with sessionmaker.begin() as s:  # an operator's redelivery never sends a flag after the results
        assert deliveries.redeliver(s, job2, now, everything=True) == [ris2]


def test_a_flag_left_waiting_is_closed_when_the_results_arrive(sessionmaker):
    job_id = _job(sessionmaker)
    now = utcnow()
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w1")
        [flag] = deliveries.prepare_flags(s, job_id, ["ris"], now)
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        [ris] = deliveries.prepare(s, job_id, ["ris"], now)
        assert deliveries.succeeded(s, deliveries.claim(s, ris, now), 1, now) == JobState.DELIVERED
    row = _delivery(sessionmaker, flag)
    assert row.state == "failed" and "results" in row.last_error
    # the job runs again and finds nothing to flag this time: the old flag row goes
    with sessionmaker.begin() as s:
        assert jobs.requeue(s, job_id)
        assert jobs.start(s, job_id, "w2")
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        assert deliveries.prepare(s, job_id, ["ris"], now) == [ris]
    assert _delivery(sessionmaker, flag) is None
