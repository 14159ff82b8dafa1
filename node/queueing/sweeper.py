"""Sweep step: the job table, not the broker, is the truth — resend lost tasks, requeue runs whose worker
died, send deliveries that are due (first try or retry), and remove outputs and received instances past their
retention."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import deliveries, review
from db.jobs import Recovery, expired_outputs, mark_enqueued, mark_outputs_removed, recover_lost
from db.models import utcnow
from db.records import expired_series, instances_before, remove_instances
from node.queueing.broker import Enqueuer
from node.settings import Settings

log = logging.getLogger("radnode.sweeper")


@dataclass(frozen=True, slots=True)
class SweepResult:
    jobs: Recovery
    deliveries_sent: list[int]
    deliveries_released: list[int]


class Sweeper:
    """One pass: requeue lost running jobs (bounded attempts), send queued jobs whose task is missing,
    send due deliveries."""

    def __init__(self, maker: sessionmaker[Session], enqueuer: Enqueuer, settings: Settings) -> None:
        self.maker = maker
        self.enqueuer = enqueuer
        self.settings = settings

    def sweep(self, now: datetime | None = None) -> SweepResult:
        """Run one pass. Raises SQLAlchemyError when the database is down (the caller retries)."""
        s = self.settings
        now = now or utcnow()
        with self.maker.begin() as session:
            recovery = recover_lost(
                session, now, lost_seconds=s.job_lost_seconds, resend_seconds=s.job_resend_seconds,
                max_attempts=s.job_max_attempts,
            )
        for job_id in recovery.requeued:
            log.warning("job %d: worker lost (no heartbeat for %g s); requeued", job_id, s.job_lost_seconds)
        for job_id in recovery.failed:
            log.error("job %d: worker lost %d times; failed", job_id, s.job_max_attempts)
        if recovery.enqueue:
            sent = self.enqueuer.send(recovery.enqueue)
            with self.maker.begin() as session:
                mark_enqueued(session, sent, utcnow())
            if sent:
                log.info("sent %d queued job(s) to the broker: %s", len(sent), ", ".join(map(str, sent)))
        with self.maker.begin() as session:
            for job_id, what in review.expire(session, now):
                log.warning("job %d: review timed out; results %s", job_id, what)
        with self.maker.begin() as session:
            due, released = deliveries.due(
                session, now, resend_seconds=s.job_resend_seconds, lost_seconds=s.job_lost_seconds,
                max_attempts=s.delivery_max_attempts,
            )
        for delivery_id in released:
            log.warning("delivery %d: worker lost while sending; released", delivery_id)
        sent_deliveries: list[int] = []
        if due:
            sent_deliveries = self.enqueuer.send_dispatch(due)
            with self.maker.begin() as session:
                deliveries.mark_enqueued(session, sent_deliveries, utcnow())
        return SweepResult(recovery, sent_deliveries, released)

    def purge_outputs(self, now: datetime | None = None) -> list[int]:
        """Remove the output folders of jobs finished longer ago than the retention. Returns the job ids."""
        days = self.settings.output_retention_days
        if days <= 0:
            return []
        now = now or utcnow()
        with self.maker() as session:
            ids = expired_outputs(session, now - timedelta(days=days))
        removed = []
        for job_id in ids:
            folder = self.settings.outputs_dir / str(job_id)
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError:
                log.exception("job %d: cannot remove its outputs; trying again later", job_id)
                continue
            with self.maker.begin() as session:
                mark_outputs_removed(session, job_id, now)
            removed.append(job_id)
        if removed:
            log.info("removed the outputs of %d job(s) past %g day(s) of retention", len(removed), days)
        return removed

    def purge_instances(self, now: datetime | None = None, limit: int = 50) -> list[int]:
        """Remove the received instances (files, then rows) of series last received longer ago than the
        instance retention, once every job of the series is finished and every delivery sent; the series
        and study rows stay (marked `instances_removed_at`). Returns the series ids done."""
        days = self.settings.instance_retention_days
        if days <= 0:
            return []
        now = now or utcnow()
        cutoff = now - timedelta(days=days)
        with self.maker() as session:
            candidates = expired_series(session, cutoff, limit)
        done = []
        for series_id in candidates:
            with self.maker() as session:  # checked again just before the files go
                if not expired_series(session, cutoff, 1, series_id):
                    continue
                instances = instances_before(session, series_id, cutoff)
            gone, failed = self._remove_files([p for _, p in instances])
            paths = {p: i for i, p in instances}
            with self.maker.begin() as session:
                remove_instances(session, series_id, [paths[p] for p in gone], now, done=not failed)
            if failed:
                log.error("series %d: %d instance file(s) could not be removed; trying again later", series_id,
                          len(failed))
                continue
            log.info("series %d: removed %d instance(s) past %g day(s) of retention", series_id, len(gone), days)
            done.append(series_id)
        return done

    def _remove_files(self, relative: list[str]) -> tuple[list[str], list[str]]:
        """Unlink instance files (gone already counts as removed), then their emptied series and study folders.
        Returns (removed, failed) relative paths."""
        root = self.settings.instances_dir
        gone, failed, folders = [], [], set()
        for rel in relative:
            path = root / rel
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove an instance file (%s)", type(exc).__name__)
                failed.append(rel)
                continue
            gone.append(rel)
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            for empty in (folder, folder.parent):
                if empty != root and root in empty.parents:
                    try:
                        empty.rmdir()
                    except OSError:
                        pass  # not empty (a late instance, another series of the study) or gone
        return gone, failed
