"""Aggregate counts of the job table, as the Prometheus collector reports them on each scrape."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Delivery, Job, JobState, Series
from db.workers import alive


@dataclass(frozen=True)
class TableCounts:
    jobs: list[tuple[str, str, int]]  # (plugin, state, count)
    queued: list[tuple[str, int]]  # (queue, jobs queued and not started)
    deliveries: list[tuple[str, str, int]]  # (destination, state, count)
    series: list[tuple[str, int]]  # (state, count)
    workers_alive: int


def table_counts(session: Session, now: datetime, alive_within_seconds: float) -> TableCounts:
    """Jobs by plugin and state, queue depth, deliveries by destination and state, series by state and the
    worker processes seen within `alive_within_seconds`."""
    return TableCounts(
        jobs=[tuple(r) for r in session.execute(
            select(Job.plugin, Job.state, func.count()).group_by(Job.plugin, Job.state))],
        queued=[tuple(r) for r in session.execute(
            select(Job.queue, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.queue))],
        deliveries=[tuple(r) for r in session.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination,
                                                                                 Delivery.state))],
        series=[tuple(r) for r in session.execute(select(Series.state, func.count()).group_by(Series.state))],
        workers_alive=len(alive(session, now, alive_within_seconds)),
    )
