"""Completeness by evidence: the judgement on header evidence, and end to end with real C-STORE (a series
complete by ImagesInAcquisition is routed long before the stability window; one that announces more
instances than arrived is held until the maximum wait; a configured count per protocol)."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from db.completeness import Acquisition, Evidence
from node.dispatch.scu import send
from node.ingest.completeness import ExpectedCount, judge
from tests.conftest import NodeProcess
from tests.synthetic import write_ct_series

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def evidence(count: int, *acquisitions: Acquisition, quiet: float = 5.0, sop: str = CT, frames: int | None = None,
             protocol: str | None = "Thorax 1.0 B60f") -> Evidence:
    return Evidence(1, "1.2.3", protocol, "Lung 1.0", sop, count, NOW - timedelta(seconds=quiet),
                    acquisitions or (Acquisition(1, count, None),), frames)


def verdict(ev: Evidence, expected=(), settle: float = 1.0, max_wait: float = 600.0):
    v = judge(ev, NOW, settle, max_wait, expected)
    return None if v is None else (v.complete, v.reason)


def test_no_evidence_leaves_the_series_to_the_window():
    assert verdict(evidence(64)) is None
    assert verdict(evidence(1, frames=200)) is None  # a classic multi-frame (e.g. US cine) proves nothing


def test_images_in_acquisition_reached_or_not():
    assert verdict(evidence(64, Acquisition(1, 64, 64))) == (
        True, "ImagesInAcquisition reached: 64 instance(s) in 1 acquisition(s)")
    assert verdict(evidence(64, Acquisition(1, 64, 64), quiet=0.2)) == (
        False, "ImagesInAcquisition reached: 64 instance(s) in 1 acquisition(s)")  # settling: not yet
    assert verdict(evidence(70, Acquisition(1, 40, 40), Acquisition(2, 30, 30)))[0] is True
    assert verdict(evidence(60, Acquisition(1, 40, 40), Acquisition(2, 20, 30))) == (
        False, "waiting: 60 of 70 announced by ImagesInAcquisition")
    assert verdict(evidence(60, Acquisition(1, 40, 40), Acquisition(2, 20, 30)), max_wait=5.0) == (
        True, "maximum wait of 5 s reached with 60 of 70 announced by ImagesInAcquisition")
    assert verdict(evidence(60, Acquisition(1, 40, 40), Acquisition(2, 20, None))) is None  # not all declare it


def test_a_configured_count_comes_first():
    expected = [ExpectedCount(re.compile("thorax 1.0", re.IGNORECASE), 64)]
    assert verdict(evidence(64), expected) == (True, "expected count reached: 64 of 64 configured for /thorax 1.0/")
    assert verdict(evidence(63, Acquisition(1, 63, 63)), expected) == (
        False, "waiting: 63 of 64 configured for /thorax 1.0/")
    assert verdict(evidence(64, protocol="Head"), expected) is None


def test_one_enhanced_multiframe_object():
    assert verdict(evidence(1, sop=ENHANCED_CT, frames=300)) == (True, "one enhanced multi-frame object of 300 frames")
    assert verdict(evidence(2, sop=ENHANCED_CT)) is None


def _series(folder: Path, slices: int, announce: int | None) -> list[Path]:
    files = write_ct_series(folder, kind="chest", slices=slices, size=32)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.AcquisitionNumber = 1
        if announce is not None:
            ds.ImagesInAcquisition = announce
        ds.save_as(f)
    return files


def _wait_series(node: NodeProcess, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series = [se for st in node.studies() for se in st["series"]]
        if series and series[0]["state"] != "receiving":
            return series[0]
        time.sleep(0.2)
    raise AssertionError(f"series still receiving after {timeout} s: {node.studies()}")


@pytest.mark.slow
def test_a_series_complete_by_its_headers_is_taken_before_the_window(start_node, tmp_path: Path):
    node = start_node(stable_seconds="60", settle_seconds="0.5")
    files = _series(tmp_path / "a", 12, announce=12)
    t0 = time.monotonic()
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
    series = _wait_series(node, timeout=30)
    assert time.monotonic() - t0 < 30  # the window is 60 s
    assert series["completion_reason"] == "ImagesInAcquisition reached: 12 instance(s) in 1 acquisition(s)"
    assert "ImagesInAcquisition reached" in node.cli("studies").stdout


@pytest.mark.slow
def test_a_series_missing_announced_instances_is_held_until_the_maximum_wait(start_node, tmp_path: Path):
    node = start_node(stable_seconds="1", settle_seconds="0.5", max_wait_seconds="8")
    files = _series(tmp_path / "b", 12, announce=16)
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
    time.sleep(4)  # well past the 1 s window: held
    [series] = [se for st in node.studies() for se in st["series"]]
    assert series["state"] == "receiving", series
    series = _wait_series(node, timeout=30)
    assert series["completion_reason"] == "maximum wait of 8 s reached with 12 of 16 announced by ImagesInAcquisition"


@pytest.mark.slow
def test_a_configured_count_completes_the_shared_ct(start_node, ct_dir: Path):
    files = sorted(ct_dir.glob("*.dcm"))
    protocol = str(pydicom.dcmread(files[0], stop_before_pixels=True).ProtocolName)
    node = start_node(stable_seconds="60", settle_seconds="0.5",
                      expected_counts=json.dumps([{"match": f"^{re.escape(protocol)}$", "count": 64}]))
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 64
    series = _wait_series(node, timeout=30)
    assert series["completion_reason"].startswith("expected count reached: 64 of 64 configured for")
