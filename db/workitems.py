"""Worklist storage: UPS workitems (PS3.4 Annex CC) as rows; every change is a compare-and-set on the row's
version, so two writers (the HTTP service and the DICOM receivers) never overwrite each other. The UPS rules live
in node/ups/workitem.py; this module stores what they decided."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import STATE, UID, Base, UTCDateTime, utcnow


class Workitem(Base):
    """One UPS instance: its state, its dataset as DICOM JSON (PS3.18 F.2) without the Transaction UID (kept
    apart, never returned), and the columns the worklist searches use."""

    __tablename__ = "workitem"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(UID, unique=True, doc="SOP Instance UID of the UPS (the Workitem UID)")
    state: Mapped[str] = mapped_column(STATE, doc="Procedure Step State: SCHEDULED, IN PROGRESS, CANCELED, COMPLETED")
    transaction_uid: Mapped[str | None] = mapped_column(UID, doc="the performer's lock; never returned")
    dataset: Mapped[dict] = mapped_column(JSON, doc="the workitem as DICOM JSON, without the Transaction UID")
    plugin: Mapped[str | None] = mapped_column(String(64), doc="CodeValue of the 99RADNODE workitem code")
    scheduled_start: Mapped[str | None] = mapped_column(
        String(14), doc="Scheduled Procedure Step Start DateTime as YYYYMMDDHHMMSS (the time as given)")
    priority: Mapped[str] = mapped_column(String(8), doc="Scheduled Procedure Step Priority: HIGH, MEDIUM, LOW")
    patient_id: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=0, doc="+1 on every change (compare-and-set)")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_by: Mapped[str | None] = mapped_column(String(64), doc="calling AE title or API token name")
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_workitem_state_start", "state", "scheduled_start"),  # the performer's poll, oldest first
        Index("ix_workitem_plugin_state", "plugin", "state"),
        Index("ix_workitem_patient", "patient_id"),
    )


class Exists(Exception):
    """A workitem with this UID exists already."""


def create(session: Session, **columns: Any) -> Workitem:
    """Insert a workitem (flushed). Raises Exists when its UID is taken (roll the transaction back then)."""
    now = utcnow()
    row = Workitem(created_at=now, updated_at=now, version=0, **columns)
    if get(session, row.uid) is not None:
        raise Exists(row.uid)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # created by another process since the check: the caller's transaction is void
        raise Exists(row.uid) from None
    return row


def get(session: Session, uid: str) -> Workitem | None:
    """The workitem with this UID, or None."""
    return session.scalars(select(Workitem).where(Workitem.uid == uid)).one_or_none()


def candidates(session: Session, *, states: list[str] | None = None, plugin: str | None = None,
               start_from: str | None = None, start_to: str | None = None, patient_id: str | None = None,
               batch: int = 200) -> Iterator[Workitem]:
    """Workitems that may match a search, by the indexed columns given, in scheduled order (then creation);
    the caller matches each against the full query."""
    query = select(Workitem)
    if states:
        query = query.where(Workitem.state.in_(states))
    if plugin is not None:
        query = query.where(Workitem.plugin == plugin)
    if start_from is not None:
        query = query.where(Workitem.scheduled_start >= start_from)
    if start_to is not None:
        query = query.where(Workitem.scheduled_start <= start_to)
    if patient_id is not None:
        query = query.where(Workitem.patient_id == patient_id)
    last: tuple[str, int] | None = None
    while True:  # keyset pages: a long worklist is read in constant memory
        page = query
        if last is not None:
            page = page.where((Workitem.scheduled_start > last[0])
                              | ((Workitem.scheduled_start == last[0]) & (Workitem.id > last[1])))
        rows = session.scalars(page.order_by(Workitem.scheduled_start, Workitem.id).limit(batch)).all()
        yield from rows
        if len(rows) < batch:
            return
        last = (rows[-1].scheduled_start or "", rows[-1].id)


def save(session: Session, row: Workitem, **changes: Any) -> bool:
    """Write `changes` to the workitem if nobody changed it since `row` was read (compare-and-set on its
    version). Returns False when it changed meanwhile (read it again and retry)."""
    changes = {"updated_at": utcnow(), **changes, "version": row.version + 1}
    result = session.execute(
        update(Workitem).where(Workitem.id == row.id, Workitem.version == row.version).values(**changes)
        .execution_options(synchronize_session=False))
    return result.rowcount == 1
