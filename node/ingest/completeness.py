"""Complete step, judgement: is a receiving series complete by what its headers say, before (or instead
of) the stability window?

Evidence, strongest first:
- an expected count configured for its protocol (`RADNODE_EXPECTED_COUNTS`) reached;
- every acquisition has the number of instances its ImagesInAcquisition announces;
- the series is one enhanced multi-frame object (Enhanced CT/MR/PET/XA/US volume, tomosynthesis), which
  holds the whole acquisition.
A series complete by evidence is taken once nothing arrived for `settle_seconds` (instances of one
association can arrive out of order). A series the evidence shows incomplete (fewer instances than
announced or configured) is held past the stability window for up to `max_wait_seconds` after its
last instance, then taken as it is, with the reason. A series without evidence is left to the window.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from db.completeness import Evidence

ENHANCED_MULTIFRAME = frozenset({
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
})


@dataclass(frozen=True)
class ExpectedCount:
    """A configured instance count for series whose ProtocolName or SeriesDescription matches `match`."""

    match: re.Pattern[str]
    count: int

    def applies(self, ev: Evidence) -> bool:
        return any(self.match.search(text or "") for text in (ev.protocol_name, ev.series_description))


@dataclass(frozen=True)
class Verdict:
    """`complete`: take the series now, with `reason`; otherwise hold it (evidence says more will come)."""

    complete: bool
    reason: str


def judge(ev: Evidence, now: datetime, settle_seconds: float, max_wait_seconds: float,
          expected: Sequence[ExpectedCount] = ()) -> Verdict | None:
    """The verdict on one receiving series, or None when its headers prove nothing (the window decides)."""
    quiet = (now - ev.newest).total_seconds()
    wanted = next((e for e in expected if e.applies(ev)), None)
    if wanted is not None:
        if ev.count >= wanted.count:
            found = f"expected count reached: {ev.count} of {wanted.count} configured for /{wanted.match.pattern}/"
            return Verdict(True, found) if quiet >= settle_seconds else Verdict(False, found)
        return _held(quiet, max_wait_seconds, f"{ev.count} of {wanted.count} configured for /{wanted.match.pattern}/")
    if ev.acquisitions and all(a.declared is not None for a in ev.acquisitions):
        announced = sum(a.declared or 0 for a in ev.acquisitions)
        missing = sum(max(0, (a.declared or 0) - a.instances) for a in ev.acquisitions)
        if missing == 0:
            found = f"ImagesInAcquisition reached: {ev.count} instance(s) in {len(ev.acquisitions)} acquisition(s)"
            return Verdict(True, found) if quiet >= settle_seconds else Verdict(False, found)
        return _held(quiet, max_wait_seconds, f"{announced - missing} of {announced} announced by ImagesInAcquisition")
    if ev.count == 1 and (ev.frames or 0) > 1 and ev.sop_class_uid in ENHANCED_MULTIFRAME:
        found = f"one enhanced multi-frame object of {ev.frames} frames"
        return Verdict(True, found) if quiet >= settle_seconds else Verdict(False, found)
    return None


def _held(quiet: float, max_wait_seconds: float, progress: str) -> Verdict:
    if quiet >= max_wait_seconds:
        return Verdict(True, f"maximum wait of {max_wait_seconds:g} s reached with {progress}")
    return Verdict(False, f"waiting: {progress}")
