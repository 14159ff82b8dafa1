"""Instance retention on SQLite and PostgreSQL with real files: the sweeper removes a series' received instances
(files, then rows) only once every job is finished, every delivery sent and the retention has passed; the series
and study rows stay; a late instance after the removal reopens the series as usual."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db import deliveries, jobs
from db.jobs import NewJob, mark_routed
from db.models import Instance, JobState, Series, SeriesState, utcnow
from db.records import ReceivedInstance, complete_stable, list_studies, record_instance
from node.ingest.tracker import Tracker
from node.queueing.sweeper import Sweeper
from node.settings import Settings

DAYS = 30


def _receive(sessionmaker, settings: Settings, study: str, series: str, at, n: int = 3) -> list[Path]:
    """n instances of one series received at `at`, each a file in the store and a row."""
    files = []
    with sessionmaker.begin() as s:
        for _ in range(n):
            sop = generate_uid()
            rel = f"{study}/{series}/{sop}.dcm"
            path = settings.instances_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * 128 + b"DICM")
            files.append(path)
            record_instance(s, ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                                rel, path.stat().st_size, "CT1", modality="CT"), at)
    return files


def _routed(sessionmaker, settings: Settings, at, job: str | None = "encoded", destinations=("pacs",)):
    """A routed series received at `at` with one job left in state `job` (encoded: its deliveries pending;
    None: no job). Returns (series id, study uid, files, job id, delivery ids)."""
    study, series = generate_uid(), generate_uid()
    files = _receive(sessionmaker, settings, study, series, at)
    with sessionmaker.begin() as s:
        complete_stable(s, at + timedelta(seconds=60), 30)
        sid = s.execute(select(Series.id).where(Series.series_uid == series)).scalar_one()
        assert mark_routed(s, sid, "jobs: p1", at + timedelta(seconds=61))
        if job is None:
            return sid, study, files, None, []
        [job_id] = jobs.create_jobs(s, sid, [NewJob("p1", "1.0", "r", "cpu", "routine")], at + timedelta(seconds=61))
    ids: list[int] = []
    with sessionmaker.begin() as s:
        if job in ("running", "encoded"):
            assert jobs.start(s, job_id, "w1")
        if job == "encoded":
            assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
            ids = deliveries.prepare(s, job_id, list(destinations), utcnow())
    return sid, study, files, job_id, ids


def _deliver(sessionmaker, delivery_id: int) -> None:
    with sessionmaker.begin() as s:
        deliveries.succeeded(s, deliveries.claim(s, delivery_id, utcnow()), 1, utcnow())


def _rows(sessionmaker, sid: int) -> int:
    with sessionmaker() as s:
        return s.execute(select(func.count(Instance.id)).where(Instance.series_id == sid)).scalar_one()


def _sweeper(sessionmaker, tmp_path: Path, days: float = DAYS) -> Sweeper:
    return Sweeper(sessionmaker, enqueuer=None, settings=Settings(data_dir=tmp_path, instance_retention_days=days))


def test_removed_when_due_series_and_study_rows_stay(sessionmaker, tmp_path):
    settings = Settings(data_dir=tmp_path)
    old = utcnow() - timedelta(days=DAYS + 1)
    sid, study, files, job_id, [d] = _routed(sessionmaker, settings, old)
    _deliver(sessionmaker, d)
    assert _sweeper(sessionmaker, tmp_path).purge_instances() == [sid]
    assert not any(f.exists() for f in files) and _rows(sessionmaker, sid) == 0
    assert not (settings.instances_dir / study).exists()  # emptied folders go too
    with sessionmaker() as s:
        [row] = list_studies(s, study)
    [series] = row["series"]
    assert series["instances"] == 0 and series["instances_removed_at"] is not None
    assert series["state"] == SeriesState.ROUTED
    with sessionmaker() as s:
        assert jobs.list_jobs(s, job_id=job_id)[0]["state"] == JobState.DELIVERED  # history kept
    assert _sweeper(sessionmaker, tmp_path).purge_instances() == []  # once


def test_kept_while_a_delivery_is_pending_or_failed(sessionmaker, tmp_path):
    settings = Settings(data_dir=tmp_path)
    old = utcnow() - timedelta(days=DAYS + 1)
    sid, _, files, _, (a, b) = _routed(sessionmaker, settings, old, destinations=("pacs", "backup"))
    _deliver(sessionmaker, a)
    sweeper = _sweeper(sessionmaker, tmp_path)
    assert sweeper.purge_instances() == []
    assert all(f.exists() for f in files) and _rows(sessionmaker, sid) == 3
    with sessionmaker.begin() as s:  # the other destination gives up: not every delivery was sent
        c = deliveries.claim(s, b, utcnow())
        deliveries.attempt_failed(s, c, "refused", utcnow(), max_attempts=1, base=1, cap=1, permanent=True)
    assert sweeper.purge_instances() == []
    assert all(f.exists() for f in files)
    with sessionmaker.begin() as s:  # an operator redelivers, and this time it arrives
        deliveries.redeliver(s, jobs.list_jobs(s, limit=1)[0]["id"], utcnow())
    _deliver(sessionmaker, b)
    assert sweeper.purge_instances() == [sid]
    assert not any(f.exists() for f in files)


def test_kept_while_a_job_is_queued_or_running(sessionmaker, tmp_path):
    settings = Settings(data_dir=tmp_path)
    old = utcnow() - timedelta(days=DAYS + 1)
    queued, _, qfiles, _, _ = _routed(sessionmaker, settings, old, job="queued")
    running, _, rfiles, _, _ = _routed(sessionmaker, settings, old, job="running")
    assert _sweeper(sessionmaker, tmp_path).purge_instances() == []
    assert all(f.exists() for f in qfiles + rfiles)
    assert _rows(sessionmaker, queued) == 3 and _rows(sessionmaker, running) == 3


def test_kept_until_the_retention_has_passed_and_never_when_off(sessionmaker, tmp_path):
    settings = Settings(data_dir=tmp_path)
    recent = utcnow() - timedelta(days=DAYS - 1)
    sid, _, files, _, _ = _routed(sessionmaker, settings, recent, job=None)  # no rule matched: nothing to wait for
    assert _sweeper(sessionmaker, tmp_path).purge_instances() == []
    assert _sweeper(sessionmaker, tmp_path, days=0).purge_instances(utcnow() + timedelta(days=999)) == []
    assert all(f.exists() for f in files)
    assert _sweeper(sessionmaker, tmp_path).purge_instances(utcnow() + timedelta(days=2)) == [sid]
    assert not any(f.exists() for f in files)


def test_a_late_instance_after_the_removal_reopens_the_series(sessionmaker, tmp_path):
    settings = Settings(data_dir=tmp_path)
    old = utcnow() - timedelta(days=DAYS + 1)
    sid, study, _, job_id, [d] = _routed(sessionmaker, settings, old)
    _deliver(sessionmaker, d)
    tracker = Tracker(sessionmaker, stable_seconds=30)
    tracker.sweep()  # a tracker that has run before: it looks only at what arrived since
    sweeper = _sweeper(sessionmaker, tmp_path)
    assert sweeper.purge_instances() == [sid]
    with sessionmaker() as s:
        series_uid = s.get(Series, sid).series_uid
    [late] = _receive(sessionmaker, settings, study, series_uid, utcnow(), n=1)
    tracker.sweep()
    with sessionmaker() as s:
        row = s.get(Series, sid)
        assert (row.state, row.reopened_count) == (SeriesState.RECEIVING, 1)
    tracker.sweep(utcnow() + timedelta(seconds=31))
    with sessionmaker() as s:
        row = s.get(Series, sid)
        assert (row.state, row.instance_count) == (SeriesState.COMPLETE, 1)
    assert late.exists() and _rows(sessionmaker, sid) == 1
    # routed again (its job re-runs on the late instance) and delivered: the late instance goes in its turn
    with sessionmaker.begin() as s:
        assert mark_routed(s, sid, "jobs: p1", utcnow())
        assert jobs.requeue_series_jobs(s, sid, ["p1"], utcnow()) == [job_id]
    assert sweeper.purge_instances(utcnow() + timedelta(days=DAYS + 1)) == []  # queued again: kept
    with sessionmaker.begin() as s:
        assert jobs.start(s, job_id, "w1")
        assert jobs.transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=["/x/SR.dcm"])
        [d] = deliveries.prepare(s, job_id, ["pacs"], utcnow())
    _deliver(sessionmaker, d)
    assert sweeper.purge_instances(utcnow() + timedelta(days=DAYS + 1)) == [sid]
    assert not late.exists() and _rows(sessionmaker, sid) == 0


def test_instance_retention_setting():
    import pytest
    from pydantic import ValidationError

    assert Settings().instance_retention_days == 0  # keep for ever unless asked
    assert Settings(instance_retention_days=365).instance_retention_days == 365
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Settings(instance_retention_days=-1)


def test_a_job_whose_instances_were_removed_cannot_be_retried_until_they_come_again(sessionmaker, tmp_path):
    import pytest

    from db.jobs import InputsRemoved, requeue

    settings = Settings(data_dir=tmp_path)
    old = utcnow() - timedelta(days=DAYS + 1)
    sid, study, _, job_id, [d] = _routed(sessionmaker, settings, old)
    _deliver(sessionmaker, d)
    assert _sweeper(sessionmaker, tmp_path).purge_instances() == [sid]
    with sessionmaker.begin() as s, pytest.raises(InputsRemoved, match="removed by the retention on"):
        requeue(s, job_id)
    with sessionmaker() as s:
        series_uid = s.get(Series, sid).series_uid
    _receive(sessionmaker, settings, study, series_uid, utcnow(), n=1)  # the series is sent again
    with sessionmaker.begin() as s:
        assert requeue(s, job_id)
