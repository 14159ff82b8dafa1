"""Complete step, evidence: what the headers of a receiving series say about how many instances it has.

The tracker (node/ingest/tracker.py) judges the evidence; this module reads it and records the verdict.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Instance, Series, SeriesState


@dataclass(frozen=True)
class Acquisition:
    """The instances of one AcquisitionNumber in a series, and the ImagesInAcquisition they declare
    (None when any of them does not say)."""

    number: int | None
    instances: int
    declared: int | None


@dataclass(frozen=True)
class Evidence:
    """A receiving series as the completeness check sees it (no patient data)."""

    series_id: int
    series_uid: str
    protocol_name: str | None
    series_description: str | None
    sop_class_uid: str | None
    count: int
    newest: datetime
    acquisitions: tuple[Acquisition, ...]
    frames: int | None  # NumberOfFrames of its single instance (None when it has several or none declared)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value  # SQLite forgets zones of aggregates


def receiving_evidence(session: Session, exclude: Collection[int] = ()) -> list[Evidence]:
    """The evidence of every receiving series (their instances grouped by AcquisitionNumber)."""
    q = (
        select(Series.id, Series.series_uid, Series.protocol_name, Series.series_description, Series.sop_class_uid,
               Instance.acquisition_number, func.count(Instance.id), func.count(Instance.images_in_acquisition),
               func.max(Instance.images_in_acquisition), func.max(Instance.received_at),
               func.max(Instance.number_of_frames))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.state == SeriesState.RECEIVING)
        .group_by(Series.id, Instance.acquisition_number)
        .order_by(Series.id)
    )
    grouped: dict[int, list] = {}
    for row in session.execute(q):
        if row[0] not in exclude:
            grouped.setdefault(row[0], []).append(row)
    out = []
    for series_id, rows in grouped.items():
        first = rows[0]
        count = sum(r[6] for r in rows)
        acquisitions = tuple(Acquisition(r[5], r[6], r[8] if r[7] == r[6] else None) for r in rows)
        out.append(Evidence(series_id, first[1], first[2], first[3], first[4], count,
                            max(_aware(r[9]) for r in rows), acquisitions, first[10] if count == 1 else None))
    return out


def complete_series(session: Session, series_id: int, now: datetime, reason: str) -> bool:
    """receiving -> complete for one series with the reason; False when it is not receiving any more.
    The caller commits."""
    count = select(func.count(Instance.id)).where(Instance.series_id == Series.id).scalar_subquery()
    newest = select(func.max(Instance.received_at)).where(Instance.series_id == Series.id).scalar_subquery()
    stmt = (
        update(Series)
        .where(Series.id == series_id, Series.state == SeriesState.RECEIVING)
        .values(state=SeriesState.COMPLETE, completed_at=now, instance_count=count, last_received_at=newest,
                completion_reason=reason[:160])
    )
    return session.execute(stmt).rowcount == 1
