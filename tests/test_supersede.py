"""Superseding results: a late instance reopens a series whose results were delivered; the job runs again as
revision 1 with new UIDs, its SR names the old SR (Predecessor Documents Sequence), a real Orthanc holds both
versions, the API and dashboard show the history; a retry with no new input reproduces revision 1's UIDs."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import httpx
import pydicom
import pytest

from node.dispatch.scu import send
from node.results.common import derive_uid
from tests.dicom_checks import assert_valid
from tests.orthanc import AE as ORTHANC_AE
from tests.synthetic import write_ct_series
from tests.test_dispatch import REFERENCE_RULES, SEG, SR, orthanc_for, stack  # noqa: F401  (fixtures)
from tests.test_pipeline import Stack

pytestmark = pytest.mark.slow


def sop_uids(job: dict, kind: str) -> list[str]:
    return sorted(o["sop_instance_uid"] for o in job["objects"] if o["kind"] == kind)


def test_a_late_instance_supersedes_the_delivered_result(stack: Stack, orthanc_for, tmp_path: Path):  # noqa: F811
    from tests.conftest import free_port

    port = free_port()
    orthanc = orthanc_for(port)
    destinations = [{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                     "port": orthanc.dicom_port}]
    node = stack.start(REFERENCE_RULES, destinations=json.dumps(destinations), dicom_port=str(port),
                       stable_seconds="1")
    files = write_ct_series(tmp_path / "ct", kind="chest", slices=16, size=64)
    first, late = files[:15], files[15:]
    orthanc.upload(first)  # the PACS holds the source series too, as in a real site
    assert send(first, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 15
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"delivered", "failed", "skipped"})
    assert job["state"] == "delivered" and job["revision"] == 0 and job["history"] == [], job
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    series_uid = job["series_uid"]
    old_sr, old_seg = sop_uids(job, "SR"), sop_uids(job, "SEG")
    assert old_sr == [derive_uid(series_uid, "reference-threshold", job["plugin_version"], "SR", 0)]  # revision 0

    orthanc.upload(late)
    assert send(late, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 1  # the late slice
    [job] = stack.wait_jobs(lambda rows: rows[0]["revision"] == 1 and rows[0]["state"] in {"delivered", "failed"},
                            timeout=120)
    assert job["state"] == "delivered", job
    new_sr, new_seg = sop_uids(job, "SR"), sop_uids(job, "SEG")
    assert new_sr and new_sr != old_sr and new_seg != old_seg
    assert new_sr == [derive_uid(series_uid, "reference-threshold", job["plugin_version"], "SR", 0, revision=1)]
    [entry] = job["history"]
    assert entry["revision"] == 0 and entry["reason"] == "new instances in the series"
    assert sorted(o["sop_instance_uid"] for o in entry["objects"] if o["kind"] == "SR") == old_sr

    # the PACS holds both versions; the new SR names the old one
    counts = Counter(i["SOPClassUID"] for i in orthanc.study_instances(study_uid))
    assert (counts[SR], counts[SEG]) == (2, 2), counts
    by_uid = {i["SOPInstanceUID"]: i["id"] for i in orthanc.study_instances(study_uid)}
    sr = pydicom.dcmread(io.BytesIO(orthanc.file(by_uid[new_sr[0]])))
    [study_item] = sr.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == study_uid
    [series_item] = study_item.ReferencedSeriesSequence
    [ref] = series_item.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (SR, old_sr[0])
    sr_path = next(Path(p) for p in job["outputs"] if Path(p).name == "SR.dcm")
    assert_valid(sr_path)  # dciodvfy: the revised SR with its Predecessor Documents is still valid

    # the dashboard shows the history
    page = httpx.get(f"{node.url}/jobs/{job['id']}", headers={"Authorization": f"Bearer {node.token}"}).text
    assert "Revisions" in page and "This is revision 1" in page and "new instances in the series" in page

    # a retry with no new input reproduces revision 1 exactly: same UIDs, nothing new in the PACS
    assert "queued again" in node.cli("jobs", "retry", str(job["id"])).stdout
    [again] = stack.wait_jobs(lambda rows: rows[0]["state"] == "delivered" and rows[0]["started_at"] != job["started_at"],
                              timeout=120)
    assert (again["revision"], sop_uids(again, "SR"), sop_uids(again, "SEG")) == (1, new_sr, new_seg)
    assert len(again["history"]) == 1
    counts = Counter(i["SOPClassUID"] for i in orthanc.study_instances(study_uid))
    assert (counts[SR], counts[SEG]) == (2, 2), counts

    # a re-sent instance reopens the series and runs the job again, but with the same inputs: same revision
    assert send(late, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 1
    [resent] = stack.wait_jobs(lambda rows: rows[0]["state"] == "delivered"
                               and rows[0]["started_at"] != again["started_at"], timeout=120)
    assert (resent["revision"], sop_uids(resent, "SR"), len(resent["history"])) == (1, new_sr, 1)
    counts = Counter(i["SOPClassUID"] for i in orthanc.study_instances(study_uid))
    assert (counts[SR], counts[SEG]) == (2, 2), counts
