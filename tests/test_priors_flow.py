"""Priors end to end: the PACS (a real Orthanc) holds the patient's chest CT of 200 days ago; a new chest CT
reaches radnode by C-STORE; lung-quant's job fetches the prior (C-FIND + C-GET, or QIDO-RS + WADO-RS), reports
the change in lung volume and LAA-950 in findings and in the SR delivered to the PACS, and the prior is never
stored or routed as a new study."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.dispatch.scu import send
from tests.conftest import free_port
from tests.dicom_checks import assert_valid
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series
from tests.test_pipeline import Stack, embedded_stack

pytestmark = pytest.mark.slow

SR = "1.2.840.10008.5.1.4.1.1.88.34"
RULES = """
rules:
  - name: chest-ct
    when: {Modality: CT}
    plugins: [lung-quant]
"""


def chest(folder: Path, study_date: date, emphysema: bool) -> list[Path]:
    """A synthetic chest CT of one patient on `study_date`; `emphysema`: part of each lung below -950 HU."""
    files = write_ct_series(folder, kind="chest", slices=40, size=128)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = "PRIOR-TEST-1", "Prior^Test"
        ds.StudyDate = ds.SeriesDate = study_date.strftime("%Y%m%d")
        if emphysema:
            pixels = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
            lung = (pixels > -900) & (pixels < -800)
            lung[:, : pixels.shape[1] // 2] = False  # one lung
            spots = np.zeros_like(lung)
            spots[::2, ::2] = True  # scattered low-attenuation voxels (no air channel for the airway search)
            pixels[lung & spots] = -980
            ds.PixelData = ((pixels - int(ds.RescaleIntercept)) // int(ds.RescaleSlope)).astype(
                ds.pixel_array.dtype).tobytes()
        ds.save_as(f)
    return files


@pytest.fixture(params=["dicom", "dicomweb"])
def setup(request, tmp_path: Path) -> Iterator[tuple[Stack, Orthanc, str]]:
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port).start()
    try:
        with embedded_stack(tmp_path) as stack:
            pacs = ({"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                     "port": orthanc.dicom_port} if request.param == "dicom" else
                    {"name": "pacs", "kind": "dicomweb", "url": orthanc.dicomweb_url})
            stack.start(RULES, dicom_port=str(port), destinations=json.dumps([pacs]), priors_source="pacs")
            yield stack, orthanc, request.param
    finally:
        orthanc.stop()


def test_lung_quant_compares_with_the_prior_from_the_pacs(setup, tmp_path: Path):
    stack, orthanc, kind = setup
    node = stack.node
    today = date.today()
    prior = chest(tmp_path / "prior", today - timedelta(days=200), emphysema=False)
    current = chest(tmp_path / "current", today, emphysema=True)
    orthanc.upload(prior)
    prior_uid = str(pydicom.dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID)
    assert send(current, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 40
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"delivered", "failed", "skipped"},
                            timeout=180)
    assert job["state"] == "delivered", job
    assert not any("prior" in w for w in job["warnings"]), job["warnings"]
    change = {m["concept"]["value"]: m["value"] for m in job["findings"]["measurements"]}
    assert abs(change["LUNGVOLCHG"]) < 150, change  # the same lungs
    assert change["LAA950CHG"] > 5, change  # a quarter of one lung is below -950 HU now
    assert "since the prior of" in job["findings"]["summary"]
    findings_json = json.loads(next(Path(p) for p in job["outputs"] if p.endswith("findings.json")).read_text())
    [used] = findings_json["priors"]
    assert (used["study_uid"], used["days_before"], used["instances"]) == (prior_uid, 200, 40)
    # the prior was fetched into the cache only: never received, tracked or routed as a study
    assert [st["study_uid"] for st in node.studies()] == [str(pydicom.dcmread(current[0]).StudyInstanceUID)]
    assert len(stack.jobs()) == 1
    # the SR in the PACS carries the comparison
    study_uid = str(pydicom.dcmread(current[0], stop_before_pixels=True).StudyInstanceUID)
    [sr] = [i for i in orthanc.study_instances(study_uid) if i["SOPClassUID"] == SR]
    ds = pydicom.dcmread(io.BytesIO(orthanc.file(sr["id"])))
    assert b"LAA950CHG" in ds.to_json().encode() or "LAA950CHG" in str(ds)
    assert_valid(next(Path(p) for p in job["outputs"] if p.endswith("SR.dcm")))
