"""Complete step: a series/study becomes `complete` once nothing arrived for the stability window."""

from __future__ import annotations

import logging
from datetime import datetime

from db.models import utcnow
from db.records import complete_stable, next_stable_at
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

    def wait_seconds(self, now: datetime | None = None) -> float:
        """How long to sleep before the next pass: the sweep period, or less when a series becomes
        stable sooner (so completion follows the window closely). Raises SQLAlchemyError."""
        with self.sessionmaker() as session:
            due = next_stable_at(session, self.stable_seconds)
        if due is None:
            return self.sweep_seconds
        until = (due - (now or utcnow())).total_seconds() + 0.005
        return min(self.sweep_seconds, max(0.005, until))
