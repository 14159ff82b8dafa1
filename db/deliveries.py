"""Record step for dispatch: one Delivery row per job x destination (pending -> sent | failed).

A pending delivery is due when `next_attempt_at` has passed; an attempt claims it by compare-and-set
(`started_at` set), so a duplicate task finds it taken and exits. A failed attempt puts it back with
an exponential backoff until the attempt cap, then marks it failed. When every delivery of a job has
settled the job moves on: all sent -> delivered, any failed -> failed (stage dispatch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from db.jobs import transition
from db.models import Delivery, DeliveryState, FailStage, Instance, Job, JobState, Series, utcnow

P, SENT, FAILED = DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.FAILED

_FRESH = dict(
    state=P, attempts=0, last_error=None, enqueued_at=None, started_at=None, heartbeat_at=None, sent_at=None,
    instances=None,
)


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the `attempts`-th failed try: base, 2*base, 4*base, ... at most cap."""
    return min(cap, base * 2 ** max(0, attempts - 1))


FLAG_SUFFIX = ":flag"  # a triage flag sent ahead of the results: delivery "<destination>:flag" (names have no ':')


IS_FLAG = Delivery.destination.endswith(FLAG_SUFFIX)


def flag_of(name: str) -> str | None:
    """The destination a flag delivery row goes to, or None for a results delivery."""
    return name.removesuffix(FLAG_SUFFIX) if name.endswith(FLAG_SUFFIX) else None


def prepare_flags(session: Session, job_id: int, destinations: Sequence[str], now: datetime) -> list[int]:
    """Pending flag deliveries (`<name>:flag`) of a running job, due now (a re-run sends the flag again).
    Returns their ids; `prepare` leaves them alone. The caller commits."""
    return prepare(session, job_id, [f"{name}{FLAG_SUFFIX}" for name in destinations], now, flags=True)


def prepare(session: Session, job_id: int, destinations: Sequence[str], now: datetime, *,
            flags: bool = False) -> list[int]:
    """Make the job's deliveries pending and due now, one per destination (a re-run resets them);
    rows for destinations no longer wanted are removed (results rows, or flag rows with `flags`). Returns the
    delivery ids. The caller commits."""
    session.execute(delete(Delivery).where(Delivery.job_id == job_id, Delivery.destination.not_in(destinations),
                                           IS_FLAG if flags else ~IS_FLAG))
    if not flags:  # flag rows of an earlier run that this run did not flag again
        session.execute(delete(Delivery).where(Delivery.job_id == job_id, IS_FLAG, Delivery.state == P,
                                               Delivery.next_attempt_at.is_(None)))
    ids = []
    for name in destinations:
        existing = session.execute(
            select(Delivery.id).where(Delivery.job_id == job_id, Delivery.destination == name)
        ).scalar_one_or_none()
        if existing is None:
            row = Delivery(job_id=job_id, destination=name, created_at=now, updated_at=now, next_attempt_at=now,
                           **_FRESH)
            session.add(row)
            session.flush()
            ids.append(row.id)
        else:
            session.execute(
                update(Delivery).where(Delivery.id == existing).values(updated_at=now, next_attempt_at=now, **_FRESH)
            )
            ids.append(existing)
    return ids


def mark_enqueued(session: Session, delivery_ids: Iterable[int], now: datetime) -> None:
    ids = list(delivery_ids)
    if ids:
        session.execute(update(Delivery).where(Delivery.id.in_(ids), Delivery.state == P).values(enqueued_at=now))


@dataclass(frozen=True, slots=True)
class Claim:
    """An attempt that owns a delivery until it records the outcome."""

    delivery_id: int
    job_id: int
    destination: str
    attempt: int


# A delivery made due by one host's clock is claimed on another's: this much skew still counts as due.
CLOCK_SKEW = timedelta(seconds=5)


def claim(session: Session, delivery_id: int, now: datetime) -> Claim | None:
    """Start an attempt: pending, due (give or take CLOCK_SKEW), not being attempted, and its job encoded.
    None when another attempt owns it, it is not due, or it has settled (a duplicate task). The caller
    commits."""
    encoded = select(Job.id).where(Job.state == JobState.ENCODED)
    running = select(Job.id).where(Job.state == JobState.RUNNING)
    stmt = (
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.state == P,
            Delivery.started_at.is_(None),
            Delivery.next_attempt_at.is_not(None),
            Delivery.next_attempt_at <= now + CLOCK_SKEW,
            # a triage flag goes while the job is still encoding
            or_(Delivery.job_id.in_(encoded), and_(IS_FLAG, Delivery.job_id.in_(running))),
        )
        .values(started_at=now, heartbeat_at=now, updated_at=now, attempts=Delivery.attempts + 1)
    )
    if session.execute(stmt).rowcount != 1:
        return None
    job_id, name, attempts = session.execute(
        select(Delivery.job_id, Delivery.destination, Delivery.attempts).where(Delivery.id == delivery_id)
    ).one()
    return Claim(delivery_id, job_id, name, attempts)


def job_outputs(session: Session, job_id: int) -> tuple[str, list[str], str | None]:
    """What a delivery of job `job_id` sends: (plugin, output paths, calling AE title the series came from)."""
    plugin, outputs, calling_ae = session.execute(
        select(Job.plugin, Job.outputs, Series.calling_ae).join(Series, Job.series_id == Series.id)
        .where(Job.id == job_id)
    ).one()
    return plugin, list(outputs or []), calling_ae


def results_sent(session: Session, job_id: int, destination: str) -> bool:
    """The job's results went to `destination` already (a flag still waiting for it is moot)."""
    return session.execute(select(Delivery.id).where(Delivery.job_id == job_id, Delivery.destination == destination,
                                                     Delivery.state == SENT)).first() is not None


def flag_inputs(session: Session, job_id: int) -> tuple[dict[str, Any] | None, str | None]:
    """What a flag message is made of: the job's recorded findings and one stored instance of its series
    (relative path; None when the retention removed them)."""
    findings, series_id = session.execute(select(Job.findings, Job.series_id).where(Job.id == job_id)).one()
    path = session.execute(select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)
                           .limit(1)).scalar_one_or_none()
    return findings, path


def heartbeat(session: Session, delivery_id: int, now: datetime | None = None) -> bool:
    stmt = (
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == P, Delivery.started_at.is_not(None))
        .values(heartbeat_at=now or utcnow())
    )
    return session.execute(stmt).rowcount == 1


def _owned(c: Claim):
    return and_(Delivery.id == c.delivery_id, Delivery.state == P, Delivery.attempts == c.attempt,
                Delivery.started_at.is_not(None))


def succeeded(session: Session, c: Claim, instances: int, now: datetime) -> str | None:
    """Record a successful attempt; returns the job's new state when this settled it."""
    stmt = update(Delivery).where(_owned(c)).values(
        state=SENT, sent_at=now, updated_at=now, started_at=None, heartbeat_at=None, last_error=None,
        instances=instances,
    )
    if session.execute(stmt).rowcount != 1:
        return None
    return settle(session, c.job_id, now)


def is_sent(session: Session, delivery_id: int) -> bool:
    return session.execute(select(Delivery.state).where(Delivery.id == delivery_id)).scalar_one_or_none() == SENT


def attempt_failed(session: Session, c: Claim, error: str, now: datetime, *, max_attempts: int, base: float,
                   cap: float, permanent: bool = False) -> tuple[str, str | None]:
    """Record a failed attempt: retry later (backoff) or, at the cap or for a permanent error, failed.

    Returns (what happened: "retry" | "failed" | "lost", the job's new state when this settled it).
    """
    error = error[:2000]
    if permanent or c.attempt >= max_attempts:
        stmt = update(Delivery).where(_owned(c)).values(
            state=FAILED, last_error=error, updated_at=now, started_at=None, heartbeat_at=None, next_attempt_at=None
        )
        if session.execute(stmt).rowcount != 1:
            return "lost", None
        return "failed", settle(session, c.job_id, now)
    due = now + timedelta(seconds=backoff(c.attempt, base, cap))
    stmt = update(Delivery).where(_owned(c)).values(
        last_error=error, updated_at=now, started_at=None, heartbeat_at=None, enqueued_at=None, next_attempt_at=due
    )
    return ("retry" if session.execute(stmt).rowcount == 1 else "lost"), None


def settle(session: Session, job_id: int, now: datetime) -> str | None:
    """Once no delivery of an encoded job is pending: all sent -> delivered, else failed (dispatch).

    The job row is locked first (PostgreSQL), so two attempts finishing at once cannot both see the
    other still pending; the sweeper settles any job left behind all the same.
    """
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    rows = session.execute(  # a triage flag sent ahead is a head start, not part of the results
        select(Delivery.destination, Delivery.state, Delivery.attempts, Delivery.last_error)
        .where(Delivery.job_id == job_id, ~IS_FLAG)
        .order_by(Delivery.destination)
    ).all()
    if not rows or any(state == P for _, state, _, _ in rows):
        return None
    failed = [(name, attempts, err) for name, state, attempts, err in rows if state == FAILED]
    if not failed:
        if not transition(session, job_id, JobState.ENCODED, JobState.DELIVERED, now):
            return None
        session.execute(update(Delivery).where(Delivery.job_id == job_id, IS_FLAG, Delivery.state == P).values(
            state=FAILED, updated_at=now, next_attempt_at=None,
            last_error="not sent: the results, which carry the flag, went first"))
        return JobState.DELIVERED
    reason = "; ".join(f"delivery to {name} failed after {n} attempt(s): {err}" for name, n, err in failed)
    done = transition(session, job_id, JobState.ENCODED, JobState.FAILED, now, fail_stage=FailStage.DISPATCH,
                      reason=reason[:4000])
    return JobState.FAILED if done else None


def due(session: Session, now: datetime, *, resend_seconds: float, lost_seconds: float, max_attempts: int,
        limit: int = 500) -> tuple[list[int], list[int]]:
    """The sweeper's pass over deliveries of encoded jobs. An attempt whose worker stopped sending
    heartbeats is released (or failed at the cap); a job whose deliveries have all settled without
    the job moving on is settled. Returns (ids to send a task for, ids released).
    The caller commits, then enqueues and marks them enqueued."""
    released: list[int] = []
    stale = now - timedelta(seconds=lost_seconds)
    lost = session.execute(
        select(Delivery.id, Delivery.job_id, Delivery.destination, Delivery.attempts)
        .where(Delivery.state == P, Delivery.started_at.is_not(None),
               or_(Delivery.heartbeat_at.is_(None), Delivery.heartbeat_at < stale))
    ).all()
    for delivery_id, job_id, name, attempts in lost:
        c = Claim(delivery_id, job_id, name, attempts)
        error = f"worker lost while sending (no heartbeat for {lost_seconds:g} s)"
        attempt_failed(session, c, error, now, max_attempts=max_attempts, base=0, cap=0)
        released.append(delivery_id)
    pending = select(Delivery.job_id).where(Delivery.state == P)
    unsettled = session.execute(
        select(Job.id).where(Job.state == JobState.ENCODED,  # from the few encoded jobs, not every delivery
                             select(Delivery.id).where(Delivery.job_id == Job.id).exists(), Job.id.not_in(pending))
    ).scalars().all()
    for job_id in unsettled:
        settle(session, job_id, now)
    resend = now - timedelta(seconds=resend_seconds)
    ids = session.execute(
        select(Delivery.id)
        .join(Job, Job.id == Delivery.job_id)
        .where(
            or_(Job.state == JobState.ENCODED, and_(IS_FLAG, Job.state == JobState.RUNNING)),
            Delivery.state == P,
            Delivery.started_at.is_(None),
            Delivery.next_attempt_at.is_not(None),
            Delivery.next_attempt_at <= now,
            or_(Delivery.enqueued_at.is_(None), Delivery.enqueued_at < resend),
        )
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    ).scalars().all()
    return list(ids), released


class NotRedeliverable(ValueError):
    """The job has nothing to redeliver (the message says why and what to do instead)."""


def redeliver(session: Session, job_id: int, now: datetime, *, everything: bool = False) -> list[int]:
    """An operator's redelivery: failed deliveries (or all with `everything`) start again with fresh
    attempts and the job returns to encoded. Raises LookupError (unknown job) or NotRedeliverable.
    Returns the delivery ids to enqueue. The caller commits."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    state = JobState(job.state)
    if state in (JobState.QUEUED, JobState.RUNNING):
        raise NotRedeliverable(f"job {job_id} is {state}: its results are not written yet")
    if state == JobState.SKIPPED or (state == JobState.FAILED and job.fail_stage != FailStage.DISPATCH):
        raise NotRedeliverable(f"job {job_id} is {state} with no results to send: use `radnode jobs retry {job_id}`")
    if job.rollout == "silent":
        raise NotRedeliverable(f"job {job_id} ran in silent mode: its results are never delivered; switch the "
                               f"plugin or rule to live and retry the job")
    if job.review_state in ("pending", "rejected"):
        raise NotRedeliverable(f"job {job_id} " + ("waits for a review: accept it to deliver it"
                                                   if job.review_state == "pending" else
                                                   f"was rejected by {job.reviewed_by}: it is never sent"))
    if job.outputs_removed_at is not None:
        raise NotRedeliverable(
            f"job {job_id}'s outputs were removed after the retention period: use `radnode jobs retry {job_id}`"
        )
    rows = session.execute(select(Delivery.id, Delivery.state).where(Delivery.job_id == job_id, ~IS_FLAG)).all()
    if not rows:
        raise NotRedeliverable(f"job {job_id} has no destinations (none configured when it was encoded)")
    chosen = [i for i, s in rows if everything or s == FAILED]
    if not chosen and state != JobState.DELIVERED:
        chosen = [i for i, s in rows if s == P]
    if not chosen:
        raise NotRedeliverable(f"job {job_id} was delivered everywhere: use --all to send it again")
    if state != JobState.ENCODED and not transition(session, job_id, state, JobState.ENCODED, now,
                                                    fail_stage=None, reason=None, delivered_at=None):
        raise NotRedeliverable(f"job {job_id} changed state meanwhile; try again")
    session.execute(
        update(Delivery).where(Delivery.id.in_(chosen)).values(updated_at=now, next_attempt_at=now, **_FRESH)
    )
    return chosen
