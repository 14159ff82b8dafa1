"""`radnode demo`: a synthetic chest CT phantom, sent to the running node, followed through the job table,
with the measured lung values printed next to the phantom's true values."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.jobs import list_jobs
from node.demo.phantom import LungTruth, Phantom, write_chest_phantom
from node.dispatch.scu import send

DEMO_AE = "RADNODE-DEMO"
SETTLED = {"delivered", "failed", "skipped"}
# (measurement concept value, unit shown, LungTruth field)
ROWS = (
    ("118565006", "mL", "volume_ml"),
    ("112181", "HU", "mean_hu"),
    ("LAA950", "%", "laa950_percent"),
    ("PERC15", "HU", "perc15_hu"),
)
SEGMENTS = (("right lung", "right"), ("left lung", "left"), ("both lungs", "total"))


class DemoError(RuntimeError):
    """The demo could not finish (node not answering, job failed, timeout); the message says why."""


@dataclass
class DemoResult:
    phantom: Phantom
    jobs: list[dict[str, Any]]


def make_phantom(folder: Path) -> Phantom:
    """The demo phantom: 2.5 mm slices covering both lungs whole, 256 x 256 (about a second to write)."""
    return write_chest_phantom(folder, spacing=2.5, size=256, seed=7)


def settled(job: dict[str, Any]) -> bool:
    """Nothing more will happen to this job without an operator (encoded counts when it has nowhere to go)."""
    return job["state"] in SETTLED or (job["state"] == "encoded" and not job["deliveries"])


def run_demo(folder: Path, host: str, port: int, called_ae: str, maker: sessionmaker[Session],
             timeout: float = 300.0, progress: Callable[[str], None] = lambda _: None) -> DemoResult:
    """Write the phantom, C-STORE it, wait until its jobs settle. Raises DemoError."""
    from node.dispatch.scu import AssociationFailed

    progress("writing a synthetic chest CT phantom")
    phantom = make_phantom(folder)
    progress(f"sending {len(phantom.paths)} slices to {called_ae}@{host}:{port}")
    try:
        report = send(phantom.paths, host, port, called_ae=called_ae, calling_ae=DEMO_AE)
    except (AssociationFailed, OSError) as exc:
        raise DemoError(f"cannot send to the node ({exc}); is `radnode run` running?") from None
    if report.sent != len(phantom.paths):
        raise DemoError(f"the node stored {report.sent} of {len(phantom.paths)} slices: {report.failed[:3]}")
    progress("waiting for the stability window, routing and the job")
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with maker() as session:
            jobs = list_jobs(session, study_uid=phantom.study_uid)
        if jobs and all(settled(j) for j in jobs):
            return DemoResult(phantom, jobs)
        time.sleep(0.5)
    states = ", ".join(f"{j['plugin']}: {j['state']}" for j in jobs) or "no job yet (is lung-quant routed?)"
    raise DemoError(f"timed out after {timeout:g} s waiting for the job: {states}")


def comparison(job: dict[str, Any], truth: Phantom) -> list[tuple[str, str, float | None, float]]:
    """(what, unit, measured, true) for each lung-quant measurement the phantom knows the truth of."""
    measured = {(m["concept"]["value"], m["segment"]): m["value"] for m in (job["findings"] or {}).get(
        "measurements", [])}
    rows = []
    for segment, side in SEGMENTS:
        lung: LungTruth = getattr(truth, side)
        for code, unit, attr in ROWS:
            label = {"118565006": "volume", "112181": "mean lung density", "LAA950": "LAA-950",
                     "PERC15": "Perc15"}[code]
            rows.append((f"{side} {label}", unit, measured.get((code, segment)), float(getattr(lung, attr))))
    return rows
