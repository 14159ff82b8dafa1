"""Complete step: a series becomes `complete` when its headers prove it (node/ingest/completeness.py) or
once nothing arrived for the stability window; a study once all its series are complete and it is stable."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from db.completeness import complete_series, receiving_evidence
from db.models import utcnow
from db.records import complete_stable, next_stable_at
from node.ingest.completeness import ExpectedCount, judge
from node.logs import uid_hash

log = logging.getLogger("radnode.tracker")
LATE_MARGIN = timedelta(seconds=120)  # an instance's row is committed this soon after its receive time
FULL_PASS_SECONDS = 300.0  # and every so often (and after the clock went back) a pass looks at every series


class Tracker:
    """Periodically completes stable series and studies in the job table."""

    def __init__(self, sessionmaker, stable_seconds: float, sweep_seconds: float = 1.0, *,
                 settle_seconds: float = 1.0, max_wait_seconds: float = 600.0,
                 expected: Sequence[ExpectedCount] = ()) -> None:
        self.sessionmaker = sessionmaker
        self.stable_seconds = stable_seconds
        self.sweep_seconds = sweep_seconds
        self.settle_seconds = settle_seconds
        self.max_wait_seconds = max(max_wait_seconds, stable_seconds)
        self.expected = tuple(expected)
        self._late_since: datetime | None = None  # None: the next pass looks at every series for late instances
        self._full_pass_at = 0.0

    def sweep(self, now: datetime | None = None) -> tuple[list[str], list[str]]:
        """One pass; returns (series UIDs, study UIDs) completed. Raises SQLAlchemyError."""
        now = now or utcnow()
        wall = utcnow()
        since = self._late_since
        if since is None or wall < since + LATE_MARGIN or time.monotonic() >= self._full_pass_at:
            since = None
        evident: list[tuple[str, str]] = []

        def evidence(session) -> list[int]:
            """Complete the series whose headers prove them complete; return those the headers hold back."""
            evident.clear()
            held = []
            for ev in receiving_evidence(session):
                verdict = judge(ev, now, self.settle_seconds, self.max_wait_seconds, self.expected)
                if verdict is None:
                    continue
                if not verdict.complete:
                    held.append(ev.series_id)
                elif complete_series(session, ev.series_id, now, verdict.reason):
                    evident.append((ev.series_uid, verdict.reason))
            return held

        with self.sessionmaker.begin() as session:
            series, studies = complete_stable(session, now, self.stable_seconds, since, evidence)
        for uid, reason in evident:
            log.info("series %s complete: %s", uid_hash(uid), reason)
        series = [uid for uid, _ in evident] + series
        if since is None:
            self._full_pass_at = time.monotonic() + FULL_PASS_SECONDS
        # the next pass looks for late instances received since this one (less the commit margin)
        self._late_since = min(now, wall) - LATE_MARGIN
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
