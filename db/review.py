"""Record step for roll-out: the mode a job runs under (live, silent, review), operators' run-time overrides per
plugin or rule, and the review of results that wait for a person before they are delivered.

Modes: `live` delivers as soon as the results are written; `silent` keeps the results on the node and never
delivers them; `review` writes the deliveries parked (not due) until a reader accepts the result (they become due)
or rejects it (they are removed: nothing is ever sent). A review may time out: `deliver` or `discard` then.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.deliveries import IS_FLAG
from db.models import Delivery, DeliveryState, Job, JobState, ReviewState, Rollout, RolloutMode

SCOPES = ("rule", "plugin")
TIMEOUT_ACTIONS = ("deliver", "discard")


@dataclass(frozen=True, slots=True)
class Mode:
    """The roll-out of one job: its mode and, in review, how long a result may wait and what happens then."""

    mode: str = Rollout.LIVE
    review_hours: float | None = None
    on_timeout: str = "discard"
    source: str = "default"  # where it came from: rule file, rule override, plugin override


def check_mode(mode: str, review_hours: float | None, on_timeout: str | None) -> None:
    """Raises ValueError with the reason for a mode the node cannot apply."""
    if mode not in set(Rollout):
        raise ValueError(f"mode must be one of {', '.join(Rollout)}, got {mode!r}")
    if review_hours is not None and (mode != Rollout.REVIEW or not review_hours > 0):
        raise ValueError("review_hours needs mode review and a positive number of hours")
    if on_timeout is not None and on_timeout not in TIMEOUT_ACTIONS:
        raise ValueError(f"on_timeout must be {' or '.join(TIMEOUT_ACTIONS)}, got {on_timeout!r}")


def set_mode(session: Session, scope: str, name: str, mode: str | None, now: datetime, *, review_hours: float | None
             = None, on_timeout: str | None = None, who: str | None = None) -> None:
    """Override the mode of a plugin or rule from now on (no restart); `mode` None removes the override. Raises
    ValueError. The caller commits."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be rule or plugin, got {scope!r}")
    session.execute(delete(RolloutMode).where(RolloutMode.scope == scope, RolloutMode.name == name))
    if mode is None:
        return
    check_mode(mode, review_hours, on_timeout)
    session.add(RolloutMode(scope=scope, name=name, mode=mode, review_hours=review_hours, on_timeout=on_timeout,
                            updated_by=who, updated_at=now))


def overrides(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(RolloutMode).order_by(RolloutMode.scope, RolloutMode.name)).scalars().all()
    return [{"scope": r.scope, "name": r.name, "mode": r.mode, "review_hours": r.review_hours,
             "on_timeout": r.on_timeout or "discard", "updated_by": r.updated_by,
             "updated_at": r.updated_at.isoformat() if r.updated_at else None} for r in rows]


def effective(session: Session, job_id: int) -> Mode:
    """The mode a job runs under now: an override of its rule, else of its plugin, else its rule in the rules
    file (recorded on the job when it was routed)."""
    job = session.execute(select(Job.plugin, Job.rule, Job.rollout, Job.review_hours, Job.review_timeout)
                          .where(Job.id == job_id)).one()
    for scope, name in (("rule", job.rule), ("plugin", job.plugin)):
        if name is None:
            continue
        row = session.execute(select(RolloutMode).where(RolloutMode.scope == scope, RolloutMode.name == name)
                              ).scalar_one_or_none()
        if row is not None:
            return Mode(row.mode, row.review_hours, row.on_timeout or "discard", f"{scope} {name} set at run time")
    return Mode(job.rollout or Rollout.LIVE, job.review_hours, job.review_timeout or "discard",
                f"rule {job.rule}" if job.rule else "default")


def record(session: Session, job_id: int, mode: Mode) -> None:
    """The mode the job runs under (at its start). The caller commits."""
    session.execute(update(Job).where(Job.id == job_id).values(
        rollout=mode.mode, review_hours=mode.review_hours, review_timeout=mode.on_timeout, review_state=None,
        reviewed_by=None, reviewed_at=None, review_note=None, review_due_at=None))


def park(session: Session, job_id: int, delivery_ids: list[int], mode: Mode, now: datetime) -> None:
    """Review mode, at encode: the deliveries wait (not due) and the job waits for a reader."""
    if delivery_ids:
        session.execute(update(Delivery).where(Delivery.id.in_(delivery_ids)).values(next_attempt_at=None))
    due = now + timedelta(hours=mode.review_hours) if mode.review_hours else None
    session.execute(update(Job).where(Job.id == job_id).values(review_state=ReviewState.PENDING, review_due_at=due))


class NotPending(ValueError):
    """The job is not waiting for a review (the message says why)."""


def decide(session: Session, job_id: int, accept: bool, reader: str, note: str | None, now: datetime,
           state: str | None = None) -> list[int]:
    """A reader accepts (deliveries become due) or rejects (deliveries removed: never sent) a result waiting for
    review. Returns the delivery ids made due (the sweeper sends them). Raises LookupError (no such job) or
    NotPending. The caller commits."""
    row = session.execute(select(Job.state, Job.rollout, Job.review_state).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise LookupError(f"no job {job_id}")
    if row.review_state != ReviewState.PENDING or row.state != JobState.ENCODED:
        what = (f"was {row.review_state}" if row.review_state else
                f"runs in {row.rollout} mode" if row.rollout != Rollout.REVIEW else f"is {row.state}")
        raise NotPending(f"job {job_id} is not waiting for a review: it {what}")
    decided = state or (ReviewState.ACCEPTED if accept else ReviewState.REJECTED)
    done = session.execute(update(Job).where(Job.id == job_id, Job.review_state == ReviewState.PENDING).values(
        review_state=decided, reviewed_by=reader[:64], reviewed_at=now, review_note=note, updated_at=now))
    if done.rowcount != 1:
        raise NotPending(f"job {job_id} was decided meanwhile")
    results = (Delivery.job_id == job_id, ~IS_FLAG, Delivery.state == DeliveryState.PENDING)
    if not accept:
        session.execute(delete(Delivery).where(*results))
        return []
    ids = list(session.execute(select(Delivery.id).where(*results)).scalars())
    if ids:
        session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(next_attempt_at=now, updated_at=now))
    return ids


def expire(session: Session, now: datetime) -> list[tuple[int, str]]:
    """Reviews past their deadline: delivered or discarded per their policy (the sweeper then sends what became
    due). Returns (job id, what happened). The caller commits."""
    rows = session.execute(select(Job.id, Job.review_timeout).where(
        Job.review_state == ReviewState.PENDING, Job.review_due_at.is_not(None), Job.review_due_at <= now)).all()
    out = []
    for job_id, action in rows:
        deliver = action == "deliver"
        try:
            decide(session, job_id, deliver, "review timeout", f"not reviewed in time: {action or 'discard'}ed",
                   now, state=ReviewState.EXPIRED)
        except NotPending:
            continue
        out.append((job_id, "delivered" if deliver else "discarded"))
    return out


def pending_count(session: Session) -> int:
    """Results waiting for a reader."""
    return session.execute(select(func.count()).select_from(Job).where(
        Job.review_state == ReviewState.PENDING, Job.state == JobState.ENCODED)).scalar_one()

