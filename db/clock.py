"""Record step for wall-clock steps: the stamps of work in flight written before a step, moved with it."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Column, ColumnElement, bindparam, select, update
from sqlalchemy.orm import Session

from db.models import Delivery, DeliveryState, Instance, Job, JobState, Series, SeriesState, Study

_series, _study, _instance = Series.__table__, Study.__table__, Instance.__table__
_job, _delivery = Job.__table__, Delivery.__table__


def _in_flight(backward: bool) -> list[tuple[Column, ColumnElement[bool]]]:
    """(stamp, which rows) that the tracker and the sweeper compare with the wall clock."""
    receiving = select(_series.c.id).where(_series.c.state == SeriesState.RECEIVING)
    pending = _delivery.c.state == DeliveryState.PENDING
    stamps = [
        (_instance.c.received_at, _instance.c.series_id.in_(receiving)),  # stability window
        (_series.c.last_received_at, _series.c.state == SeriesState.RECEIVING),
        (_study.c.last_received_at, _study.c.state == SeriesState.RECEIVING),
        (_job.c.heartbeat_at, _job.c.state == JobState.RUNNING),  # lease of a running job
        (_job.c.enqueued_at, _job.c.state == JobState.QUEUED),  # resend of a lost task
        (_delivery.c.heartbeat_at, pending),
        (_delivery.c.enqueued_at, pending),
        (_delivery.c.next_attempt_at, pending),  # retry backoff
    ]
    if backward:  # a late instance is one received after completion: completion must not lie in the future
        stamps.append((_series.c.completed_at, _series.c.state != SeriesState.RECEIVING))
    return stamps


def shift_in_flight(session: Session, seconds: float, pivot: datetime) -> int:
    """Move by `seconds` the in-flight stamps written before a wall-clock step of `seconds`: those earlier than
    `pivot` for a step forward, later than it for a step back (`pivot` lies between what the old clock and what
    the new one can have written). Each row is moved by compare-and-set, so a stamp another process rewrote
    meanwhile in the new clock stays as it is. Returns the number of stamps moved. The caller commits."""
    step = timedelta(seconds=seconds)
    moved = 0
    conn = session.connection()
    for column, in_flight in _in_flight(backward=seconds < 0):
        before = column < pivot if seconds > 0 else column > pivot
        rows = conn.execute(select(column.table.c.id, column).where(in_flight, column.is_not(None), before)).all()
        if not rows:
            continue
        stmt = (
            update(column.table)
            .where(column.table.c.id == bindparam("_id"), column == bindparam("_old", type_=column.type))
            .values({column.name: bindparam("_new", type_=column.type)})
        )
        result = conn.execute(stmt, [{"_id": i, "_old": old, "_new": old + step} for i, old in rows])
        moved += max(result.rowcount, 0)
    return moved
