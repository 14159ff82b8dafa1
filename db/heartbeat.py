"""A side thread that marks a long step (a job run, a delivery attempt) alive in the job table."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("radnode.heartbeat")


class Heartbeat:
    """Calls `beat(session)` every `period` seconds in its own transaction until stopped; stops early
    when `beat` returns False (the row was taken back by the sweeper)."""

    def __init__(self, maker: sessionmaker[Session], beat: Callable[[Session], bool], period: float,
                 what: str) -> None:
        self.maker, self.beat, self.period, self.what = maker, beat, period, what
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{what}", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                with self.maker.begin() as session:
                    if not self.beat(session):
                        log.warning("%s is no longer held here (the sweeper took it back)", self.what)
                        return
            except Exception:
                log.exception("%s: heartbeat failed; retrying", self.what)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
