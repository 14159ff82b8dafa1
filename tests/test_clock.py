"""Wall-clock steps (node/queueing/clock.py, db/clock.py): a step is told from drift and load, and the stamps of work in
flight written before it move with it, on SQLite and PostgreSQL. The live case is in test_faults."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db import deliveries, jobs
from db.clock import shift_in_flight
from db.models import Delivery, Instance, Job, JobState, Series, SeriesState, utcnow
from db.records import record_instance
from node.queueing.clock import StepWatch
from tests.test_deliveries import _encoded
from tests.test_jobs import _job
from tests.test_records import rec


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono = 1_800_000_000.0, 1000.0

    def advance(self, seconds: float, step: float = 0.0) -> None:
        self.wall += seconds + step
        self.mono += seconds


def test_a_step_is_told_from_drift_and_load(sessionmaker):
    c = Clocks()
    watch = StepWatch(sessionmaker, wall=lambda: c.wall, mono=lambda: c.mono)
    c.advance(0.25)
    assert watch.look() is None
    c.advance(30, step=0.4)  # a stalled pass, NTP slewing: no step
    assert watch.look() is None
    c.advance(0.25, step=7200)
    forward = watch.look()
    assert forward is not None and forward.seconds == 7200
    assert forward.pivot == datetime.fromtimestamp(c.wall - 3600, UTC)  # between the old clock and the new
    c.advance(0.25, step=-3600)
    back = watch.look()
    assert back is not None and back.seconds == -3600 and back.pivot == datetime.fromtimestamp(c.wall + 1800, UTC)
    c.advance(2, step=3)  # a step no larger than the time between looks: stamps cannot be told apart
    assert watch.look() is None
    assert watch.pending == [forward, back]
    watch.check()  # applied to the (empty) job table in order, then forgotten
    assert watch.pending == []


def test_stamps_written_before_a_step_forward_move_with_it(sessionmaker):
    step = timedelta(hours=2)
    old = utcnow() - timedelta(seconds=1)  # the old clock just before the step
    with sessionmaker.begin() as s:
        record_instance(s, rec("1.2.3.9.1", series="1.2.3.9"), old)  # a series being received
    running, after_step = _job(sessionmaker, "p1"), _job(sessionmaker, "p2")
    job_done, [delivery_id] = _encoded(sessionmaker, plugin="p3")
    with sessionmaker.begin() as s:
        encoded_at = s.get(Job, job_done).encoded_at
        assert jobs.start(s, running, "w1", now=old)
        assert jobs.start(s, after_step, "w1", now=old + step)  # its worker beat in the new clock already
        s.execute(Delivery.__table__.update().values(next_attempt_at=old + timedelta(seconds=30)))
        assert shift_in_flight(s, step.total_seconds(), old + step / 2) >= 4
    with sessionmaker() as s:
        [instance] = s.query(Instance).join(Series).filter(Series.series_uid == "1.2.3.9").all()
        assert instance.received_at == old + step
        assert s.query(Series).filter_by(series_uid="1.2.3.9").one().last_received_at == old + step
        assert s.get(Job, running).heartbeat_at == old + step  # the lease keeps its length
        assert s.get(Job, after_step).heartbeat_at == old + step  # written in the new clock: as it was
        assert s.get(Delivery, delivery_id).next_attempt_at == old + step + timedelta(seconds=30)
        assert s.get(Job, job_done).encoded_at == encoded_at  # what is done is history: not moved


def test_stamps_written_before_a_step_back_move_with_it(sessionmaker):
    step = timedelta(hours=-1)
    old = utcnow() + timedelta(hours=1)  # the old clock ran an hour ahead
    with sessionmaker.begin() as s:
        record_instance(s, rec("1.2.3.8.1", series="1.2.3.8"), old)
        record_instance(s, rec("1.2.3.8.2", series="1.2.3.8"), utcnow())  # received after the step
    job_id, [delivery_id] = _encoded(sessionmaker)
    with sessionmaker.begin() as s:
        s.execute(Series.__table__.update().where(Series.state != SeriesState.RECEIVING).values(completed_at=old))
        s.execute(Delivery.__table__.update().values(next_attempt_at=old + timedelta(seconds=30)))
        assert shift_in_flight(s, step.total_seconds(), utcnow() + timedelta(minutes=30)) >= 3
    with sessionmaker() as s:
        received = sorted(i.received_at for i in s.query(Instance).join(Series).filter(Series.series_uid == "1.2.3.8"))
        assert len(received) == 2 and old + step in received  # the stamp from after the step stays as it was
        assert s.get(Delivery, delivery_id).next_attempt_at == old + step + timedelta(seconds=30)  # not an hour late
        routed = s.get(Job, job_id).series_id
        assert s.get(Series, routed).completed_at == old + step  # a late instance is after it again
        assert deliveries.due(s, utcnow() + timedelta(seconds=31), resend_seconds=30, lost_seconds=60,
                              max_attempts=3)[0] == [delivery_id]
        assert s.get(Job, job_id).state == JobState.ENCODED
