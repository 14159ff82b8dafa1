"""Complete step: a series/study becomes `complete` once nothing arrived for the stability window."""

from __future__ import annotations

import logging
from datetime import datetime

from db.models import utcnow
from db.records import complete_stable
from node.logs import uid_hash

log = logging.getLogger("radnode.tracker")


class Tracker:
    """Periodically completes stable series and studies in the job table."""

    def __init__(self, sessionmaker, stable_seconds: float, sweep_seconds: float = 1.0) -> None:
        self.sessionmaker = sessionmaker
        self.stable_seconds = stable_seconds
        self.sweep_seconds = sweep_seconds

    def sweep(self, now: datetime | None = None) -> tuple[list[str], list[str]]:
        """One pass; returns (series UIDs, study UIDs) completed. Raises SQLAlchemyError."""
        with self.sessionmaker.begin() as session:
            series, studies = complete_stable(session, now or utcnow(), self.stable_seconds)
        for uid in series:
            log.info("series %s complete", uid_hash(uid))
        for uid in studies:
            log.info("study %s complete", uid_hash(uid))
        return series, studies
