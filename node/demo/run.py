"""`radnode demo`: a synthetic chest CT phantom, sent to the running node, followed through the job table,
with the measured values printed next to the phantom's true values.

The demo names no plugin: a job's measurements are matched with the phantom's truth through the job's plugin
manifest (plugins.registry), by coded concept and segment type (`phantom.TRUTH_QUANTITIES`, `TRUTH_REGIONS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.jobs import list_jobs
from node.demo.phantom import TRUTH_QUANTITIES, TRUTH_REGIONS, LungTruth, Phantom, write_chest_phantom
from node.dispatch.scu import send
from plugins.base import Manifest
from plugins.registry import discover

DEMO_AE = "RADNODE-DEMO"
SETTLED = {"delivered", "failed", "skipped"}


class DemoError(RuntimeError):
    """The demo could not finish (node not answering, job failed, timeout); the message says why."""


@dataclass
class DemoResult:
    phantom: Phantom
    jobs: list[dict[str, Any]]
    manifests: dict[str, Manifest]  # the installed plugins: what each job's plugin measures


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

    manifests = discover().manifests
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
            return DemoResult(phantom, jobs, manifests)
        time.sleep(0.5)
    measuring = " or ".join(name for name, m in manifests.items() if _truth_segments(m) and _truth_findings(m))
    states = ", ".join(f"{j['plugin']}: {j['state']}" for j in jobs) or (
        f"no job yet (is {measuring or 'a plugin measuring the lungs'} routed?)")
    raise DemoError(f"timed out after {timeout:g} s waiting for the job: {states}")


def comparison(job: dict[str, Any], truth: Phantom,
               manifest: Manifest | None) -> list[tuple[str, str, float | None, float]]:
    """(what, unit, measured, true) for each measurement the job's plugin (`manifest`) declares and the phantom
    knows the truth of: a declared finding about a declared segment whose type is one of the phantom's regions.
    Measured is None where the job reported no value."""
    if manifest is None:
        return []
    measured = {(m["concept"]["scheme"], m["concept"]["value"], m["segment"]): m["value"]
                for m in (job["findings"] or {}).get("measurements", [])}
    segments, findings = _truth_segments(manifest), _truth_findings(manifest)
    rows = []
    for region, side, attr in TRUTH_REGIONS:
        if region not in segments:
            continue
        lung: LungTruth = getattr(truth, attr)
        for concept, name, unit, field in TRUTH_QUANTITIES:
            if concept in findings:
                rows.append((f"{side} {name}", unit, measured.get((*concept, segments[region])),
                             float(getattr(lung, field))))
    return rows


def _truth_segments(manifest: Manifest) -> dict[tuple[str, str], str]:
    """The manifest's segment label for each phantom region its segments code."""
    regions = {region for region, _, _ in TRUTH_REGIONS}
    return {(s.type.scheme, s.type.value): s.label for s in manifest.segments
            if (s.type.scheme, s.type.value) in regions}


def _truth_findings(manifest: Manifest) -> set[tuple[str, str]]:
    """The phantom's quantities the manifest declares as findings."""
    quantities = {concept for concept, _, _, _ in TRUTH_QUANTITIES}
    return {(c.scheme, c.value) for c in manifest.findings} & quantities
