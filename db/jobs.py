"""Record step: the job state machine (allowed transitions, compare-and-set) and job queries."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import (
    Delivery,
    DeliveryState,
    FailStage,
    Instance,
    Job,
    JobState,
    Priority,
    Series,
    SeriesState,
    Study,
    utcnow,
)

Q, R, E, D, F, S = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.ENCODED,
    JobState.DELIVERED,
    JobState.FAILED,
    JobState.SKIPPED,
)

# The one table of allowed transitions. RUNNING -> QUEUED is the sweeper recovering a lost run;
# a finished state -> QUEUED is an operator's retry (or a reopened series being routed again);
# DELIVERED/FAILED -> ENCODED is an operator's redelivery of results already written.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    Q: frozenset({R, S, F}),
    R: frozenset({E, F, S, Q}),
    E: frozenset({D, F, Q}),
    D: frozenset({Q, E}),
    F: frozenset({Q, E}),
    S: frozenset({Q}),
}
TERMINAL = frozenset({E, D, F, S})  # no worker holds the job: it may be retried (E waits only on dispatch)
STAMP = {Q: "queued_at", R: "started_at", E: "encoded_at", D: "delivered_at", F: "finished_at", S: "finished_at"}


class IllegalTransition(ValueError):
    """A transition that the job state machine does not allow."""


def transition(session: Session, job_id: int, src: JobState, dst: JobState, now: datetime | None = None,
               **values: Any) -> bool:
    """Compare-and-set `src -> dst` on one job, setting the stage timestamp and `values`.

    Returns False when the job is no longer in `src` (another worker or the sweeper moved it):
    the caller then does nothing. Raises IllegalTransition for a move the table forbids.
    The caller commits.
    """
    if dst not in TRANSITIONS[JobState(src)]:
        raise IllegalTransition(f"job {job_id}: {src} -> {dst} is not allowed")
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.state == src)
        .values(state=dst, updated_at=now, **{STAMP[JobState(dst)]: now}, **values)
    )
    return session.execute(stmt).rowcount == 1


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job the router wants for a series."""

    plugin: str
    plugin_version: str
    rule: str
    queue: str
    priority: str
    destinations: list[str] | None = None  # None: every configured destination
    not_before: datetime | None = None  # held until then (the rule's hours)
    extra_series: list[str] | None = None  # a multi-series plugin's other series (Series Instance UIDs)
    rollout: str = "live"  # the rule's roll-out mode (db.review: an operator's override wins at run time)
    review_hours: float | None = None
    review_timeout: str = "discard"


def _insert(session: Session):
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(Job)


def create_jobs(session: Session, series_id: int, jobs: Sequence[NewJob], now: datetime) -> list[int]:
    """Create the queued jobs of a series, at most one per plugin (a second routing adds none).

    Returns the ids of the jobs created now. The caller commits, then enqueues.
    """
    created = []
    for job in jobs:
        stmt = (
            _insert(session)
            .values(
                series_id=series_id, plugin=job.plugin, plugin_version=job.plugin_version, rule=job.rule,
                queue=job.queue, priority=job.priority, destinations=job.destinations, state=JobState.QUEUED,
                attempts=0, created_at=now, updated_at=now, queued_at=now, not_before=job.not_before,
                extra_series=job.extra_series, rollout=job.rollout, review_hours=job.review_hours,
                review_timeout=job.review_timeout,
            )
            .on_conflict_do_nothing(index_elements=["series_id", "plugin"])
            .returning(Job.id)
        )
        job_id = session.execute(stmt).scalar_one_or_none()
        if job_id is not None:
            created.append(job_id)
    return created


_RESET = dict(
    outputs_removed_at=None, fail_stage=None, reason=None, warnings=None, findings=None, outputs=None, timings=None,
    started_at=None, heartbeat_at=None, encoded_at=None, delivered_at=None, finished_at=None, enqueued_at=None,
)


class InputsRemoved(Exception):
    """The job's received instances were removed by the instance retention: it cannot run until they come again."""


def requeue(session: Session, job_id: int, now: datetime | None = None) -> bool:
    """Put a finished job (encoded, delivered, failed, skipped) back in the queue with fresh attempts.

    Returns False when the job is queued or running already. Raises LookupError for an unknown id and
    InputsRemoved when the retention removed its series' instances (and none came since). The caller
    commits, then enqueues.
    """
    newest = select(func.max(Instance.received_at)).where(Instance.series_id == Series.id).scalar_subquery()
    row = session.execute(
        select(Job.state, Series.instances_removed_at, newest).join(Series, Series.id == Job.series_id)
        .where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        raise LookupError(f"no job {job_id}")
    state, removed, newest_at = row
    if JobState(state) not in TERMINAL:
        return False
    if removed is not None and newest_at is None:  # removed, and nothing received since
        raise InputsRemoved(f"job {job_id}: its series' instances were removed by the retention on "
                            f"{removed:%Y-%m-%d}; send the series again to run it")
    if not transition(session, job_id, JobState(state), Q, now, attempts=0, **_RESET):
        return False
    # its deliveries wait (not due) until the job is encoded again, which makes them due afresh
    session.execute(
        update(Delivery)
        .where(Delivery.job_id == job_id)
        .values(state=DeliveryState.PENDING, next_attempt_at=None, started_at=None, heartbeat_at=None,
                enqueued_at=None, updated_at=now or utcnow())
    )
    return True


def requeue_series_jobs(session: Session, series_id: int, plugins: Iterable[str], now: datetime) -> list[int]:
    """Re-run the finished jobs of a series that was reopened and routed again. Returns their ids."""
    ids = session.execute(
        select(Job.id).where(Job.series_id == series_id, Job.plugin.in_(list(plugins)), Job.state.in_(TERMINAL))
    ).scalars().all()
    return [i for i in ids if requeue(session, i, now)]


def mark_enqueued(session: Session, job_ids: Iterable[int], now: datetime) -> None:
    """Record that the jobs' tasks were handed to the broker (the sweeper's clock starts)."""
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), Job.state == Q).values(enqueued_at=now))


def start(session: Session, job_id: int, worker: str, now: datetime | None = None, **values: Any) -> bool:
    """queued -> running for one attempt (counts it). False when another delivery of the task won."""
    now = now or utcnow()
    return transition(session, job_id, Q, R, now, attempts=Job.attempts + 1, worker=worker, heartbeat_at=now,
                      fail_stage=None, reason=None, **values)


def record_flags(session: Session, job_id: int, findings: dict[str, Any], now: datetime | None = None) -> bool:
    """A running job's findings are in and hold a positive triage flag: record them (the flag message is made
    from them before the objects exist) and raise the job to stat priority. False when it is no longer running."""
    stmt = update(Job).where(Job.id == job_id, Job.state == R).values(findings=findings, priority=Priority.STAT,
                                                                      updated_at=now or utcnow())
    return session.execute(stmt).rowcount == 1


def heartbeat(session: Session, job_id: int, now: datetime | None = None) -> bool:
    """A running job is alive. False when it is no longer running (the sweeper took it back)."""
    stmt = update(Job).where(Job.id == job_id, Job.state == R).values(heartbeat_at=now or utcnow())
    return session.execute(stmt).rowcount == 1


def fail(session: Session, job_id: int, src: JobState, stage: FailStage, reason: str, **values: Any) -> bool:
    """`src -> failed` with the stage and reason (kept short enough to read in a table)."""
    return transition(session, job_id, src, F, fail_stage=stage, reason=reason[:4000], **values)


def skip(session: Session, job_id: int, src: JobState, reason: str, **values: Any) -> bool:
    """`src -> skipped` with the reason (model unavailable, not applicable, ...)."""
    return transition(session, job_id, src, S, reason=reason[:4000], **values)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What one sweeper pass decided: jobs to (re-)enqueue and jobs given up."""

    enqueue: list[tuple[int, str, str]]  # (job id, queue, priority)
    requeued: list[int]
    failed: list[int]


def recover_lost(session: Session, now: datetime, *, lost_seconds: float, resend_seconds: float,
                 max_attempts: int) -> Recovery:
    """The sweeper's pass over the job table (the source of truth, not the broker).

    - a running job whose heartbeat is older than `lost_seconds` lost its worker: back to queued,
      or failed once it has used `max_attempts` attempts;
    - a queued job never handed to the broker, or handed over more than `resend_seconds` ago and
      still not started, is sent again (a duplicate message finds the job moved and exits).
    The caller commits, then enqueues `enqueue` and marks them enqueued.
    """
    stale = now - timedelta(seconds=lost_seconds)
    requeued, failed = [], []
    rows = session.execute(
        select(Job.id, Job.attempts).where(Job.state == R, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale))
    ).all()
    for job_id, attempts in rows:
        if attempts >= max_attempts:
            reason = f"worker lost during each of {attempts} attempts (no heartbeat for {lost_seconds:g} s)"
            if fail(session, job_id, R, FailStage.INFER, reason):
                failed.append(job_id)
        elif transition(session, job_id, R, Q, now, enqueued_at=None, heartbeat_at=None):
            requeued.append(job_id)
    resend = now - timedelta(seconds=resend_seconds)
    due = session.execute(
        select(Job.id, Job.queue, Job.priority)
        .where(Job.state == Q, or_(Job.enqueued_at.is_(None), Job.enqueued_at < resend),
               or_(Job.not_before.is_(None), Job.not_before <= now))
        .order_by(Job.id)
    ).all()
    return Recovery(enqueue=[(i, q, p) for i, q, p in due], requeued=requeued, failed=failed)


def hand_back(session: Session, workers: Collection[str], now: datetime) -> list[int]:
    """Running jobs held by these worker processes ("host:pid") back to queued, to be sent again at once:
    their worker was stopped before they finished. Returns their ids."""
    ids = session.execute(select(Job.id).where(Job.state == R, Job.worker.in_(list(workers))).order_by(Job.id))
    return [i for i in ids.scalars() if transition(session, i, R, Q, now, enqueued_at=None, heartbeat_at=None)]


def expired_outputs(session: Session, cutoff: datetime, limit: int = 200) -> list[int]:
    """Jobs whose outputs may be removed: finished (delivered, failed, skipped, or encoded with nothing
    left to deliver) before `cutoff`, outputs not removed yet."""
    pending = select(Delivery.job_id).where(Delivery.state == DeliveryState.PENDING)
    return list(
        session.execute(
            select(Job.id)
            .where(
                Job.outputs_removed_at.is_(None),
                Job.updated_at < cutoff,
                or_(Job.state.in_([D, F, S]), and_(Job.state == E, Job.id.not_in(pending))),
            )
            .order_by(Job.id)
            .limit(limit)
        ).scalars()
    )


def mark_outputs_removed(session: Session, job_id: int, now: datetime) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(outputs_removed_at=now))


def series_paths(session: Session, series_id: int) -> list[str]:
    """Relative storage paths of a series' instances, in arrival order."""
    return list(
        session.execute(select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)).scalars()
    )


def series_and_paths(session: Session, series_id: int) -> tuple[Series, Study, list[str]]:
    """A series, its study and its instances' relative storage paths in arrival order (the router and the
    worker read these; the objects' columns stay readable after the session closes). Raises LookupError."""
    series = session.get(Series, series_id)
    if series is None:
        raise LookupError(f"no series {series_id}")
    return series, session.get(Study, series.study_id), series_paths(session, series_id)


def job_row(session: Session, job_id: int) -> RowMapping | None:
    """One job's columns as a plain mapping (a snapshot, readable after the session closes); None for an
    unknown id."""
    return session.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one_or_none()


def series_job(session: Session, series_id: int, plugin: str) -> Job:
    """The job of `plugin` on a series (at most one per series and plugin). Raises NoResultFound."""
    return session.execute(select(Job).where(Job.series_id == series_id, Job.plugin == plugin)).scalar_one()


def queue_items(session: Session, job_ids: Sequence[int], now: datetime | None = None) -> list[tuple[int, str, str]]:
    """(job id, queue, priority) of these jobs: what sending their tasks needs. With `now`, jobs held until
    later (a rule's hours) are left out: the sweeper sends them when their time comes."""
    q = select(Job.id, Job.queue, Job.priority).where(Job.id.in_(list(job_ids)))
    if now is not None:
        q = q.where(or_(Job.not_before.is_(None), Job.not_before <= now))
    rows = session.execute(q).all()
    return [(i, q, p) for i, q, p in rows]


def add_timing(session: Session, job_id: int, name: str, seconds: float) -> None:
    """Add (or replace) one entry of a job's timings, e.g. `deliver:PACS`. The caller commits."""
    job = session.get(Job, job_id)
    timings = dict(job.timings or {})
    timings[name] = seconds
    job.timings = timings


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_dict(job: Job, series_uid: str, study_uid: str) -> dict[str, Any]:
    """The JSON form of a job (`radnode jobs --json`)."""
    return {
        "id": job.id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "plugin": job.plugin,
        "plugin_version": job.plugin_version,
        "rule": job.rule,
        "queue": job.queue,
        "priority": job.priority,
        "state": job.state,
        "attempts": job.attempts,
        "warnings": job.warnings or [],
        "error": job.reason if job.state == JobState.FAILED else None,
        "fail_stage": job.fail_stage,
        "reason": job.reason,
        "outputs": job.outputs or [],
        "outputs_removed_at": _iso(job.outputs_removed_at),
        "destinations": job.destinations,
        "findings": job.findings,
        "timings": job.timings or {},
        "weights_sha256": job.weights_sha256,
        "worker": job.worker,
        "created_at": _iso(job.created_at),
        "queued_at": _iso(job.queued_at),
        "not_before": _iso(job.not_before),
        "revision": job.revision or 0,
        "objects": job.objects or [],
        "history": job.history or [],
        "extra_series": job.extra_series or [],
        "rollout": job.rollout or "live",
        "review_state": job.review_state,
        "reviewed_by": job.reviewed_by,
        "reviewed_at": _iso(job.reviewed_at),
        "review_note": job.review_note,
        "review_due_at": _iso(job.review_due_at),
        "input_stats": job.input_stats,
        "started_at": _iso(job.started_at),
        "encoded_at": _iso(job.encoded_at),
        "delivered_at": _iso(job.delivered_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
    }


def list_jobs(session: Session, state: str | None = None, plugin: str | None = None, study_uid: str | None = None,
              limit: int = 200, since: datetime | None = None, job_id: int | None = None,
              offset: int = 0, after: int | None = None) -> list[dict[str, Any]]:
    """Jobs newest first with their deliveries, optionally filtered (`since`: updated at or after).

    `after` (keyset pagination): only jobs older than this job id, i.e. the next page after a page that
    ended with it; a deep page costs what a first page costs, and jobs created meanwhile never shift it.
    """
    q = (
        select(Job, Series.series_uid, Study.study_uid)
        .join(Series, Job.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .order_by(Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    conditions = []
    if job_id is not None:
        conditions.append(Job.id == job_id)
    if after is not None:
        conditions.append(Job.id < after)
    if since is not None:
        conditions.append(Job.updated_at >= since)
    if state:
        conditions.append(Job.state == state)
    if plugin:
        conditions.append(Job.plugin == plugin)
    if study_uid:
        conditions.append(Study.study_uid == study_uid)
    if conditions:
        q = q.where(and_(*conditions))
    rows = session.execute(q).all()
    deliveries = delivery_dicts(session, [job.id for job, _, _ in rows])
    return [job_dict(job, se, st) | {"deliveries": deliveries[job.id]} for job, se, st in rows]


def delivery_dicts(session: Session, job_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Deliveries of these jobs as JSON-ready dicts, by job id."""
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in job_ids}
    if not job_ids:
        return out
    rows = session.execute(
        select(Delivery).where(Delivery.job_id.in_(list(job_ids))).order_by(Delivery.job_id, Delivery.destination)
    ).scalars()
    for d in rows:
        out[d.job_id].append({
            "id": d.id,
            "destination": d.destination,
            "state": d.state,
            "attempts": d.attempts,
            "last_error": d.last_error,
            "instances": d.instances,
            "next_attempt_at": _iso(d.next_attempt_at) if d.state == DeliveryState.PENDING else None,
            "sent_at": _iso(d.sent_at),
        })
    return out


def series_to_route(session: Session, limit: int = 50) -> list[int]:
    """Ids of complete series waiting to be routed, oldest first."""
    return list(
        session.execute(
            select(Series.id).where(Series.state == SeriesState.COMPLETE).order_by(Series.completed_at).limit(limit)
        ).scalars()
    )


def claim_series(session: Session, series_id: int, note: str, now: datetime) -> None:
    """A series submitted with its own jobs (POST /v1/infer) is routed now: the tracker and router leave it
    alone (a later instance still reopens it). A series routed already keeps its note. The caller commits."""
    count = select(func.count(Instance.id)).where(Instance.series_id == Series.id).scalar_subquery()
    session.execute(
        update(Series)
        .where(Series.id == series_id, Series.state != SeriesState.ROUTED)
        .values(state=SeriesState.ROUTED, completed_at=now, routed_at=now, route_note=note, instance_count=count)
    )


def mark_routed(session: Session, series_id: int, note: str, now: datetime) -> bool:
    """complete -> routed with the router's note. False when the series was reopened meanwhile."""
    stmt = (
        update(Series)
        .where(Series.id == series_id, Series.state == SeriesState.COMPLETE)
        .values(state=SeriesState.ROUTED, routed_at=now, route_note=note)
    )
    return session.execute(stmt).rowcount == 1


def studies_to_route(session: Session, limit: int = 50) -> list[int]:
    """Ids of complete studies waiting for the study-level rules, oldest first."""
    return list(session.execute(
        select(Study.id).where(Study.state == SeriesState.COMPLETE).order_by(Study.completed_at).limit(limit)
    ).scalars())


def study_series(session: Session, study_id: int) -> tuple[Study, list[Series]]:
    """A study and its series (complete or routed ones: the study is complete). Raises LookupError."""
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study {study_id}")
    rows = session.execute(select(Series).where(Series.study_id == study_id).order_by(Series.id)).scalars().all()
    return study, list(rows)


def mark_study_routed(session: Session, study_ids: Sequence[int] | None, note: str, now: datetime) -> list[int]:
    """complete -> routed for these studies (None: every complete study) with the note; returns the ids
    that moved (a study reopened meanwhile stays receiving). The caller commits."""
    q = update(Study).where(Study.state == SeriesState.COMPLETE)
    if study_ids is not None:
        q = q.where(Study.id.in_(list(study_ids)))
    return list(session.execute(
        q.values(state=SeriesState.ROUTED, routed_at=now, route_note=note).returning(Study.id)
    ).scalars())
