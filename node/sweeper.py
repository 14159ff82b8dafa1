"""Sweep step: the job table, not the broker, is the truth — resend lost tasks, requeue runs whose worker died."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from db.jobs import Recovery, mark_enqueued, recover_lost
from db.models import utcnow
from node.queueing import Enqueuer
from node.settings import Settings

log = logging.getLogger("radnode.sweeper")


class Sweeper:
    """One pass: requeue lost running jobs (bounded attempts), send queued jobs whose task is missing."""

    def __init__(self, maker: sessionmaker[Session], enqueuer: Enqueuer, settings: Settings) -> None:
        self.maker = maker
        self.enqueuer = enqueuer
        self.settings = settings

    def sweep(self, now: datetime | None = None) -> Recovery:
        """Run one pass. Raises SQLAlchemyError when the database is down (the caller retries)."""
        s = self.settings
        with self.maker.begin() as session:
            recovery = recover_lost(
                session, now or utcnow(), lost_seconds=s.job_lost_seconds, resend_seconds=s.job_resend_seconds,
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
        return recovery
