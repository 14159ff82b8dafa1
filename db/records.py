"""Receiving bookkeeping in the job table: record instances, complete stable series/studies, list them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import Instance, Series, SeriesState, Study


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """What the receive path records for one instance (header fields, no patient data)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    calling_ae: str | None
    modality: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    manufacturer: str | None = None
    slice_thickness: float | None = None
    image_type: str | None = None
    series_number: int | None = None
    number_of_frames: int | None = None


def _insert(session: Session, table: Any):
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(table)


def _ensure_series(session: Session, rec: ReceivedInstance, now: datetime) -> int:
    """Create the study and series on first sight (concurrent receivers race safely); return the series id."""
    session.execute(
        _insert(session, Study)
        .values(
            study_uid=rec.study_uid,
            state=SeriesState.RECEIVING,
            study_description=rec.study_description,
            first_received_at=now,
            last_received_at=now,
            reopened_count=0,
        )
        .on_conflict_do_nothing(index_elements=["study_uid"])
    )
    study_id = session.execute(select(Study.id).where(Study.study_uid == rec.study_uid)).scalar_one()
    session.execute(
        _insert(session, Series)
        .values(
            series_uid=rec.series_uid,
            study_id=study_id,
            state=SeriesState.RECEIVING,
            modality=rec.modality,
            sop_class_uid=rec.sop_class_uid,
            body_part_examined=rec.body_part_examined,
            series_description=rec.series_description,
            protocol_name=rec.protocol_name,
            manufacturer=rec.manufacturer,
            slice_thickness=rec.slice_thickness,
            image_type=rec.image_type,
            series_number=rec.series_number,
            calling_ae=rec.calling_ae,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            reopened_count=0,
        )
        .on_conflict_do_nothing(index_elements=["series_uid"])
    )
    return session.execute(select(Series.id).where(Series.series_uid == rec.series_uid)).scalar_one()


class InstanceRecorder:
    """Records received instances with one statement each once their series is known.

    Study and series rows are created on first sight and their ids cached in this process;
    last-received times, completion and reopening are derived from the instance rows by
    `complete_stable`, so the hot path never contends on a shared series row.
    """

    def __init__(self, max_cached: int = 10_000) -> None:
        self._series_ids: dict[str, int] = {}
        self._max_cached = max_cached

    def record(self, session: Session, rec: ReceivedInstance, now: datetime) -> bool:
        """Record one stored instance, idempotently; the caller commits.

        A re-sent SOP Instance UID updates its row (and counts the resend) instead of adding
        one. Returns True when the instance is new.
        """
        series_id = self._series_ids.get(rec.series_uid)
        if series_id is None:
            series_id = _ensure_series(session, rec, now)
            if len(self._series_ids) >= self._max_cached:
                self._series_ids.clear()
            self._series_ids[rec.series_uid] = series_id
        values = {
            "sop_instance_uid": rec.sop_instance_uid,
            "series_id": series_id,
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "path": rec.path,
            "size_bytes": rec.size_bytes,
            "number_of_frames": rec.number_of_frames,
            "calling_ae": rec.calling_ae,
            "received_at": now,
        }
        stmt = _insert(session, Instance).values(**values, receive_count=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=["sop_instance_uid"],
            set_={k: stmt.excluded[k] for k in values} | {"receive_count": Instance.receive_count + 1},
        ).returning(Instance.receive_count)
        return session.execute(stmt).scalar_one() == 1

    def forget(self) -> None:
        """Drop the cached ids (after a database outage the rows may be gone)."""
        self._series_ids.clear()


def record_instance(session: Session, rec: ReceivedInstance, now: datetime) -> bool:
    """Record one instance without a cache (reconciling, tests). See InstanceRecorder.record."""
    return InstanceRecorder().record(session, rec, now)


def complete_stable(session: Session, now: datetime, window_seconds: float) -> tuple[list[str], list[str]]:
    """The tracker's pass: refresh last-received times, reopen, then complete stable series/studies.

    - a series (and its study) that is complete or routed but received an instance after its
      completion goes back to `receiving` and its reopen is counted;
    - a receiving series completes once its newest instance is `window_seconds` old, recording
      its instance count; a study completes once all its series are complete and it is as old.

    Returns (series UIDs completed, study UIDs completed); the caller commits.
    """
    cutoff = now - timedelta(seconds=window_seconds)
    newest = select(func.max(Instance.received_at)).where(Instance.series_id == Series.id).scalar_subquery()
    late = select(Instance.id).where(Instance.series_id == Series.id, Instance.received_at > Series.completed_at)
    session.execute(
        update(Series)
        .where(Series.state != SeriesState.RECEIVING, late.exists())
        .values(state=SeriesState.RECEIVING, completed_at=None, reopened_count=Series.reopened_count + 1)
    )
    receiving_series = select(Series.id).where(Series.study_id == Study.id, Series.state == SeriesState.RECEIVING)
    session.execute(  # a late instance or a new series reopens its study
        update(Study)
        .where(Study.state != SeriesState.RECEIVING, receiving_series.exists())
        .values(state=SeriesState.RECEIVING, completed_at=None, reopened_count=Study.reopened_count + 1)
    )
    session.execute(
        update(Series)
        .where(Series.state == SeriesState.RECEIVING, newest.is_not(None))
        .values(last_received_at=newest)
    )
    count = select(func.count(Instance.id)).where(Instance.series_id == Series.id).scalar_subquery()
    series_done = (
        session.execute(
            update(Series)
            .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
            .values(state=SeriesState.COMPLETE, completed_at=now, instance_count=count)
            .returning(Series.series_uid)
        )
        .scalars()
        .all()
    )
    newest_series = select(func.max(Series.last_received_at)).where(Series.study_id == Study.id).scalar_subquery()
    session.execute(
        update(Study).where(Study.state == SeriesState.RECEIVING).values(last_received_at=newest_series)
    )
    studies_done = (
        session.execute(
            update(Study)
            .where(Study.state == SeriesState.RECEIVING, Study.last_received_at <= cutoff, ~receiving_series.exists())
            .values(state=SeriesState.COMPLETE, completed_at=now)
            .returning(Study.study_uid)
        )
        .scalars()
        .all()
    )
    return list(series_done), list(studies_done)


def next_stable_at(session: Session, window_seconds: float) -> datetime | None:
    """When the earliest receiving series becomes stable (its newest instance + the window), or None."""
    newest = (
        select(func.max(Instance.received_at).label("newest"))
        .join(Series, Instance.series_id == Series.id)
        .where(Series.state == SeriesState.RECEIVING)
        .group_by(Series.id)
        .subquery()
    )
    earliest = session.execute(select(func.min(newest.c.newest))).scalar_one_or_none()
    if earliest is None:
        return None
    if earliest.tzinfo is None:  # SQLite forgets the time zone of an aggregate
        earliest = earliest.replace(tzinfo=UTC)
    return earliest + timedelta(seconds=window_seconds)


def series_id_of(session: Session, series_uid: str) -> int:
    """The id of a recorded series. Raises NoResultFound."""
    return session.execute(select(Series.id).where(Series.series_uid == series_uid)).scalar_one()


def known_paths(session: Session) -> set[str]:
    """Relative paths of every recorded instance (for reconciling the store after a crash)."""
    return set(session.execute(select(Instance.path)).scalars())


def _studies_query(study_uid: str | None) -> Select:
    q = select(Study).order_by(Study.first_received_at.desc(), Study.id.desc())
    return q.where(Study.study_uid == study_uid) if study_uid else q


def list_studies(session: Session, study_uid: str | None = None, limit: int = 200, offset: int = 0,
                 since: datetime | None = None) -> list[dict[str, Any]]:
    """Studies with their series, state and live instance counts, newest first (`since`: received since)."""
    q = _studies_query(study_uid)
    if since is not None:
        q = q.where(Study.last_received_at >= since)
    studies = session.execute(q.limit(limit).offset(offset)).scalars().all()
    if not studies:
        return []
    ids = [s.id for s in studies]
    rows = session.execute(
        select(Series, func.count(Instance.id))
        .outerjoin(Instance, and_(Instance.series_id == Series.id))
        .where(Series.study_id.in_(ids))
        .group_by(Series.id)
        .order_by(Series.id)
    ).all()
    by_study: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for series, n in rows:
        by_study[series.study_id].append(
            {
                "series_uid": series.series_uid,
                "modality": series.modality,
                "instances": n,
                "state": series.state,
                "series_number": series.series_number,
                "series_description": series.series_description,
                "body_part_examined": series.body_part_examined,
                "sop_class_uid": series.sop_class_uid,
                "calling_ae": series.calling_ae,
                "first_received_at": series.first_received_at.isoformat(),
                "last_received_at": series.last_received_at.isoformat(),
                "completed_at": series.completed_at.isoformat() if series.completed_at else None,
                "reopened_count": series.reopened_count,
                "routed_at": series.routed_at.isoformat() if series.routed_at else None,
                "route_note": series.route_note,
            }
        )
    return [
        {
            "study_uid": s.study_uid,
            "state": s.state,
            "study_description": s.study_description,
            "first_received_at": s.first_received_at.isoformat(),
            "last_received_at": s.last_received_at.isoformat(),
            "completed_at": s.completed_at.isoformat() if s.completed_at else None,
            "reopened_count": s.reopened_count,
            "series": by_study[s.id],
        }
        for s in studies
    ]
