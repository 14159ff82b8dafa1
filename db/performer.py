"""Record step of the UPS task performer: one row per worklist workitem radnode claimed, written before the claim
is sent, so a restarted node resumes its workitems instead of claiming them twice."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, UniqueConstraint, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.jobs import NewJob, create_jobs, requeue, series_job
from db.models import STATE, UID, Base, Instance, JobState, Series, SeriesState, Study, UTCDateTime, utcnow


class TaskState(enum.StrEnum):
    """claimed -> retrieving -> running -> completing -> completed; canceling -> canceled from any open state;
    failed: given up (the workitem is gone or belongs to another performer)."""

    CLAIMED = "claimed"
    RETRIEVING = "retrieving"
    RUNNING = "running"
    COMPLETING = "completing"
    CANCELING = "canceling"
    COMPLETED = "completed"
    CANCELED = "canceled"
    FAILED = "failed"


FINAL = frozenset({TaskState.COMPLETED, TaskState.CANCELED, TaskState.FAILED})


class PerformedTask(Base):
    """A workitem of a UPS-RS worklist that radnode performs (or performed)."""

    __tablename__ = "performed_task"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_url: Mapped[str] = mapped_column(String(512), doc="UPS-RS service root the workitem lives on")
    workitem_uid: Mapped[str] = mapped_column(UID)
    transaction_uid: Mapped[str] = mapped_column(UID, doc="our Transaction UID: the lock on the workitem")
    plugin: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(STATE, default=TaskState.CLAIMED)
    study_uid: Mapped[str | None] = mapped_column(UID)
    series_uids: Mapped[list | None] = mapped_column(JSON, doc="input series, once the workitem was read")
    job_ids: Mapped[list | None] = mapped_column(JSON, doc="the jobs that perform it")
    attempts: Mapped[int] = mapped_column(Integer, default=0, doc="failed tries of the current step")
    reason: Mapped[str | None] = mapped_column(Text, doc="why it is canceled or failed; the last error while open")
    reason_code: Mapped[str | None] = mapped_column(String(16), doc="CID 9300 code value of a cancellation")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="the provider accepted the claim; null: "
                                                        "the claim was sent but its answer is not known")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("provider_url", "workitem_uid", name="uq_performed_task_workitem"),
        Index("ix_performed_task_state", "state"),
    )


def record_claim(session: Session, provider_url: str, workitem_uid: str, transaction_uid: str, plugin: str,
                 now: datetime | None = None) -> int | None:
    """Record that we are about to claim a workitem (before the claim is sent). Returns the new row's id, or None
    when this workitem is recorded already (claimed before: it is resumed, never claimed again). Commits."""
    now = now or utcnow()
    task = PerformedTask(provider_url=provider_url, workitem_uid=workitem_uid, transaction_uid=transaction_uid,
                         plugin=plugin, state=TaskState.CLAIMED, attempts=0, created_at=now, updated_at=now)
    session.add(task)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return task.id


def known_workitems(session: Session, provider_url: str, uids: list[str]) -> set[str]:
    """Which of these workitem UIDs have a row (open or finished)."""
    if not uids:
        return set()
    rows = session.execute(select(PerformedTask.workitem_uid).where(PerformedTask.provider_url == provider_url,
                                                                     PerformedTask.workitem_uid.in_(uids)))
    return set(rows.scalars())


def open_tasks(session: Session, provider_url: str) -> list[PerformedTask]:
    """The tasks still to be finished, oldest first (the objects stay readable after the session closes)."""
    return list(session.execute(
        select(PerformedTask).where(PerformedTask.provider_url == provider_url,
                                    PerformedTask.state.not_in(list(FINAL))).order_by(PerformedTask.id)
    ).scalars())


def move(session: Session, task_id: int, src: TaskState, dst: TaskState, now: datetime | None = None,
         **values: Any) -> bool:
    """Compare-and-set `src -> dst` with `values`; a final state stamps finished_at. False when the task is no
    longer in `src`. The caller commits."""
    now = now or utcnow()
    extra = {"finished_at": now} if dst in FINAL else {}
    stmt = (update(PerformedTask).where(PerformedTask.id == task_id, PerformedTask.state == src)
            .values(state=dst, updated_at=now, **extra, **values))
    return session.execute(stmt).rowcount == 1


def note_error(session: Session, task_id: int, reason: str, now: datetime | None = None) -> int:
    """Count one failed try of the task's current step with its reason. Returns the tries so far; the caller
    commits."""
    task = session.get(PerformedTask, task_id)
    if task is None:
        raise LookupError(f"no performed task {task_id}")
    task.attempts = (task.attempts or 0) + 1
    task.reason = reason[:4000]
    task.updated_at = now or utcnow()
    return task.attempts


def take_series(session: Session, series_id: int, note: str, now: datetime) -> None:
    """A workitem's input series is routed now, by the workitem and not by the rules: the tracker and router leave
    it alone (instances stored before `now` do not reopen it, a later one does), and its study too once every
    series of the study is routed. The caller commits."""
    count = select(func.count(Instance.id)).where(Instance.series_id == Series.id).scalar_subquery()
    session.execute(update(Series).where(Series.id == series_id).values(
        state=SeriesState.ROUTED, completed_at=now, routed_at=now, route_note=note, instance_count=count))
    study_id = select(Series.study_id).where(Series.id == series_id).scalar_subquery()
    unrouted = select(Series.id).where(Series.study_id == Study.id, Series.state != SeriesState.ROUTED)
    session.execute(update(Study).where(Study.id == study_id, ~unrouted.exists()).values(
        state=SeriesState.ROUTED, completed_at=now, routed_at=now, route_note=note))


def adopt_job(session: Session, series_id: int, job: NewJob, now: datetime) -> tuple[int, bool]:
    """The job of `job.plugin` on the series: created now, or the one there already (a rule made it) adopted:
    its destinations widened to include `job.destinations`, and run again when it failed, was skipped, lost its
    outputs, or finished before the new destinations were added (output UIDs are deterministic: a PACS gets no
    duplicate). Returns (job id, whether its task must be sent). The caller commits, then sends."""
    created = create_jobs(session, series_id, [job], now)
    if created:
        return created[0], True
    row = series_job(session, series_id, job.plugin)
    widened = False
    if row.destinations is not None:
        wanted = None if job.destinations is None else sorted(set(row.destinations) | set(job.destinations))
        widened = wanted != sorted(row.destinations)
        row.destinations = wanted
    state = JobState(row.state)
    rerun = state in (JobState.FAILED, JobState.SKIPPED) or (
        state in (JobState.ENCODED, JobState.DELIVERED) and (widened or row.outputs_removed_at is not None))
    session.flush()
    return row.id, rerun and requeue(session, row.id, now)
