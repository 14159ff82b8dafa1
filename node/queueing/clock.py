"""Wall-clock steps: the stability window, the heartbeat leases and the retry waits compare wall-clock stamps
that several processes wrote in the job table. When the wall clock steps (NTP correcting a wrong clock, an
operator setting it) the node notices it against the monotonic clock and moves the stamps of the work in flight
that were written before the step by as much, so the step neither cuts those waits short nor stretches them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from db.clock import shift_in_flight

log = logging.getLogger("radnode.clock")

TOLERANCE = 1.0  # seconds: NTP slews a clock by far less between two looks; a step is more


@dataclass(frozen=True, slots=True)
class Step:
    """The wall clock moved `seconds` more than the monotonic clock between two looks (negative: back)."""

    seconds: float
    pivot: datetime  # after it the new clock, before it the old one (half the step from the new clock's reading)


class StepWatch:
    """Looks at both clocks on each pass of the node's pipeline; `check()` applies a step to the job table
    before anything else in the pass compares stamps."""

    def __init__(self, maker: sessionmaker[Session], wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.maker, self._wall, self._mono = maker, wall, mono
        self._last = (wall(), mono())
        self.pending: list[Step] = []

    def look(self) -> Step | None:
        """The step since the last look, if the clocks parted by more than TOLERANCE (it is then pending)."""
        wall, mono = self._wall(), self._mono()
        elapsed = mono - self._last[1]
        seconds = (wall - self._last[0]) - elapsed
        self._last = (wall, mono)
        if abs(seconds) < TOLERANCE:
            return None
        if abs(seconds) < 2 * elapsed + TOLERANCE:  # too small to tell old stamps from new: left as they are
            log.warning("the wall clock stepped %+.1f s; too small a step to move the timestamps with it", seconds)
            return None
        step = Step(seconds, datetime.fromtimestamp(wall - seconds / 2, UTC))
        self.pending.append(step)
        return step

    def check(self) -> None:
        """Look, then apply every pending step. Raises SQLAlchemyError (the step stays pending)."""
        self.look()
        while self.pending:
            step = self.pending[0]
            with self.maker.begin() as session:
                moved = shift_in_flight(session, step.seconds, step.pivot)
            self.pending.pop(0)
            log.warning("the wall clock stepped %+.0f s; %d timestamp(s) of work in flight moved with it (stability "
                        "windows, heartbeat leases and retry waits keep their length)", step.seconds, moved)
