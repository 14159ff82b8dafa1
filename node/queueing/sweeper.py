"""Sweep step: the job table, not the broker, is the truth — resend lost tasks, requeue runs whose worker
died, send deliveries that are due (first try or retry), and remove outputs past their retention."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import deliveries
from db.jobs import Recovery, expired_outputs, mark_enqueued, mark_outputs_removed, recover_lost
from db.models import utcnow
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
