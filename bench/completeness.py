"""Completeness benchmark: seconds from a series' last instance to its routing, by how completion is decided.

What it measures
    The shared Philips chest CT (64 slices, ``ct_chest_philips_lungdx_a0001``; no ImagesInAcquisition)
    is sent with new UIDs by one DCMTK ``storescu`` association to ``radnode run`` (SQLite, no rules, so
    routing does nothing but mark the series routed). For each send the job table gives the series'
    newest instance time and its ``routed_at``; the difference is the time from last instance to routing.
    Three ways to decide completeness, each on its own node, ``--repeat`` sends each (median reported):

    * ``window``: the stability window only (``RADNODE_STABLE_SECONDS``, default 30: the default setting);
    * ``count``: the same window, plus an expected count of 64 configured for the CT's ProtocolName
      (``RADNODE_EXPECTED_COUNTS``), as a site would for a fixed protocol;
    * ``iia``: the same window, and every slice carries ImagesInAcquisition 64, as many scanners write.

    With evidence, completion waits ``RADNODE_SETTLE_SECONDS`` (default 1) after the last instance
    instead of the window.

Caveats
    The tracker polls (at most every ``RADNODE_SWEEP_SECONDS``, 0.25 s) and the router runs the CT lung
    pixel check only when a rule names a chest-CT plugin (not here), so the figures are completion +
    routing bookkeeping, not inference.

Usage
    .venv/bin/python bench/completeness.py [--repeat 3] [--stable 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (  # noqa: E402  (bench/ is not a package)
    BenchError,
    Processes,
    Radnode,
    SeriesFactory,
    default_source,
    load_templates,
    send,
    start_radnode,
)

MODES = ("window", "count", "iia")


def wait_routed(node: Radnode, study_uid: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series = [se for st in node.studies(study_uid) for se in st["series"]]
        if series and series[0]["state"] == "routed":
            return series[0]
        time.sleep(0.1)
    raise BenchError(f"study {study_uid} not routed after {timeout:g} s")


def run_mode(mode: str, args: argparse.Namespace, factory: SeriesFactory, protocol: str, work: Path) -> list[dict]:
    (work / "logs").mkdir(parents=True)
    (work / "no-rules.yaml").write_text("rules: []\n")
    env = {"RADNODE_STABLE_SECONDS": str(args.stable), "RADNODE_RULES_FILE": str(work / "no-rules.yaml")}
    if mode == "count":
        expected = [{"match": f"^{re.escape(protocol)}$", "count": len(factory.templates)}]
        env["RADNODE_EXPECTED_COUNTS"] = json.dumps(expected)
    procs = Processes()
    runs = []
    try:
        node = start_radnode(procs, work, receivers=None, extra_env=env)
        for i in range(args.repeat):
            series = factory.make(work / f"series-{i}", len(factory.templates), f"completeness {mode}")
            if mode == "iia":
                for f in series.files:
                    ds = pydicom.dcmread(f)
                    ds.ImagesInAcquisition = len(series.files)
                    ds.save_as(f)
            send(procs, node, series.files, 1, work / "logs", f"{mode}-{i}")
            routed = wait_routed(node, series.study_uid, timeout=args.stable + 120)
            last = datetime.fromisoformat(routed["last_received_at"])
            seconds = (datetime.fromisoformat(routed["routed_at"]) - last).total_seconds()
            runs.append({"seconds": round(seconds, 3), "reason": routed["completion_reason"]})
            print(f"  {mode} #{i + 1}: {seconds:6.2f} s  ({routed['completion_reason']})", flush=True)
    finally:
        procs.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stable", type=float, default=30.0, help="stability window in seconds (default 30)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    templates = load_templates(default_source())
    protocol = str(templates[0].get("ProtocolName", ""))
    factory = SeriesFactory(templates)
    results: dict[str, list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="radnode-bench-complete-") as tmp:
            for mode in MODES:
                results[mode] = run_mode(mode, args, factory, protocol, Path(tmp) / mode)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    base = statistics.median(r["seconds"] for r in results["window"])
    print(f"\nlast instance -> routed, {len(templates)}-slice CT, window {args.stable:g} s, median of {args.repeat}:")
    for mode in MODES:
        med = statistics.median(r["seconds"] for r in results[mode])
        print(f"  {mode:<7} {med:7.2f} s   {base / med if med else float('inf'):6.1f}x faster than the window"
              f"   ({results[mode][0]['reason']})")
    if args.json:
        args.json.write_text(json.dumps({"stable_seconds": args.stable, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
