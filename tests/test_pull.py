"""Pull side against a real Orthanc: `radnode pull` (Orthanc REST and DICOMweb WADO-RS) and the /changes
watcher feed the same storage path as C-STORE, so the study is completed, routed and run as usual."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import weights_path
from tests.conftest import free_port
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series
from tests.test_pipeline import REFERENCE_RULES, Stack, embedded_stack

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Stack, Orthanc, int]]:
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port).start()
    try:
        with embedded_stack(tmp_path) as stack:
            write_weights(weights_path(REFERENCE, stack.models), 300.0)
            yield stack, orthanc, port
    finally:
        orthanc.stop()


def _study(tmp_path: Path, name: str, slices: int = 12) -> tuple[list[Path], str]:
    files = write_ct_series(tmp_path / name, kind="chest", slices=slices, size=64)
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _stored(stack: Stack, study_uid: str) -> dict[str, bytes]:
    root = stack.tmp_path / "data" / "instances" / study_uid
    return {p.stem: p.read_bytes() for p in root.rglob("*.dcm")}


def test_pull_from_orthanc_and_dicomweb(setup, tmp_path: Path):
    stack, orthanc, port = setup
    node = stack.start(REFERENCE_RULES, dicom_port=str(port))
    files, study_uid = _study(tmp_path, "a")
    orthanc.upload(files)
    out = node.cli("pull", "--orthanc", orthanc.url, "--study", study_uid)
    assert "pulled 12 instance(s), 0 failed" in out.stdout, out
    stored = _stored(stack, study_uid)
    originals = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f.read_bytes() for f in files}
    assert set(stored) == set(originals)
    for uid, data in stored.items():  # Orthanc's stored file as it is (its file meta may differ)
        assert pydicom.dcmread(io.BytesIO(data)) == pydicom.dcmread(io.BytesIO(originals[uid]))
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"encoded", "failed", "skipped"})
    assert job["state"] == "encoded", job
    [series] = [se for st in node.studies() for se in st["series"]]
    assert (series["calling_ae"], series["instances"]) == (ORTHANC_AE, 12)

    files_b, study_b = _study(tmp_path, "b", slices=8)
    orthanc.upload(files_b)
    out = node.cli("pull", "--dicomweb", orthanc.dicomweb_url, "--study", study_b, "--ae", "WEBPACS")
    assert "pulled 8 instance(s), 0 failed" in out.stdout, out
    stored = _stored(stack, study_b)
    for f in files_b:
        original = pydicom.dcmread(f)
        got = pydicom.dcmread(io.BytesIO(stored[original.SOPInstanceUID]))
        assert got.PixelData == original.PixelData and got.ImagePositionPatient == original.ImagePositionPatient
    stack.wait_jobs(lambda rows: len(rows) == 2 and {r["state"] for r in rows} == {"encoded"})
    assert {se["calling_ae"] for st in node.studies() for se in st["series"]} == {ORTHANC_AE, "WEBPACS"}

    missing = node.cli("pull", "--orthanc", orthanc.url, "--study", "1.2.3.4.5", check=False)
    assert missing.returncode == 1 and "has no study 1.2.3.4.5" in missing.stderr
    missing = node.cli("pull", "--dicomweb", orthanc.dicomweb_url, "--study", "1.2.3.4.5", check=False)
    assert missing.returncode == 1 and "1.2.3.4.5" in missing.stderr
    down = node.cli("pull", "--orthanc", f"http://127.0.0.1:{free_port()}", "--study", study_uid, check=False)
    assert down.returncode == 1 and "Orthanc http://127.0.0.1" in down.stderr
    both = node.cli("pull", "--study", study_uid, check=False)
    assert both.returncode == 2 and "exactly one of" in both.stderr


def test_watcher_pulls_stable_studies_and_resumes_after_restart(setup, tmp_path: Path):
    stack, orthanc, port = setup
    old, _ = _study(tmp_path, "before")
    orthanc.upload(old)  # stable in Orthanc before the watcher's first start: not pulled
    deadline = time.monotonic() + 30
    while not any(c["ChangeType"] == "StableStudy" for c in orthanc.get("/changes?limit=1000")["Changes"]):
        assert time.monotonic() < deadline, "Orthanc never marked the study stable"
        time.sleep(0.2)
    watch = json.dumps({"url": orthanc.url, "interval_seconds": 0.5})
    node = stack.start(REFERENCE_RULES, dicom_port=str(port), watch_orthanc=watch)
    files, study_uid = _study(tmp_path, "after")
    orthanc.upload(files)  # Orthanc marks it stable after its StableAge (2 s); the watcher pulls it
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"encoded", "failed", "skipped"})
    assert job["state"] == "encoded" and job["study_uid"] == study_uid, job
    state = json.loads((stack.tmp_path / "data" / "watch-orthanc.json").read_text())
    assert state["last"] > 0
    node.stop()
    files2, study2 = _study(tmp_path, "while-down")
    orthanc.upload(files2)  # arrives while radnode is stopped: pulled after the restart
    stack.start(REFERENCE_RULES, dicom_port=str(port), watch_orthanc=watch)
    rows = stack.wait_jobs(lambda rows: len(rows) == 2 and all(r["state"] == "encoded" for r in rows))
    assert {r["study_uid"] for r in rows} == {study_uid, study2}
    assert len(_stored(stack, study2)) == 12

