"""The whole flow with the packaged default rules: C-STORE the shared chest CT -> lung-quant on a real worker
-> SR/SEG/SC delivered to a real Orthanc, dciodvfy-clean; `radnode demo` against the same node."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

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

SEG, SR, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Stack, Orthanc]]:
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port).start()
    try:
        with embedded_stack(tmp_path) as stack:
            destinations = [{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                             "port": orthanc.dicom_port}]
            stack.start(None, dicom_port=str(port), destinations=json.dumps(destinations))  # default rules
            yield stack, orthanc
    finally:
        orthanc.stop()


def test_chest_ct_to_lung_quant_to_orthanc_and_the_demo(setup, ct_dir: Path, tmp_path: Path):
    stack, orthanc = setup
    node = stack.node
    files = sorted(ct_dir.glob("*.dcm"))
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 64
    # a head CT labelled as a chest: the lung pixel check keeps it away from lung-quant
    head = write_ct_series(tmp_path / "head", kind="head", slices=20, size=64, study_description="CT CHEST",
                           series_description="Chest")
    assert send(head, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 20
    rows = stack.wait_jobs(lambda rows: len(rows) == 2 and all(r["state"] in {"delivered", "failed", "skipped"}
                                                               for r in rows), timeout=180)
    job = next(r for r in rows if r["plugin"] == "lung-quant")
    assert (job["rule"], job["state"]) == ("chest-ct-lungs", "delivered"), job
    triage = next(r for r in rows if r["plugin"] == "ct-chest-triage")  # no weights here: skipped, saying why
    assert triage["state"] == "skipped" and "model unavailable" in triage["reason"], triage
    measured = {(m["concept"]["meaning"], m["segment"]): m["value"] for m in job["findings"]["measurements"]}
    right, left = measured[("Volume", "right lung")], measured[("Volume", "left lung")]
    assert 1000 < left < right < 4000 and 2500 < measured[("Volume", "both lungs")] < 8000
    assert any("slice thickness 5.0 mm" in w for w in job["warnings"])
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    counts = Counter(i["SOPClassUID"] for i in orthanc.study_instances(study_uid))
    sc = sum(1 for p in job["outputs"] if Path(p).name.startswith("SC-"))
    assert counts == Counter({SEG: 1, SR: 1, SC: sc}) and sc == 3, counts  # the CT went to radnode only
    for p in job["outputs"]:
        if p.endswith(".dcm"):
            assert_valid(Path(p))
    seg = pydicom.dcmread(next(p for p in job["outputs"] if p.endswith("SEG.dcm")), stop_before_pixels=True)
    assert sorted(s.SegmentLabel for s in seg.SegmentSequence) == ["both lungs", "left lung", "low-attenuation areas",
                                                                   "right lung"]
    head_series = [se for st in node.studies() for se in st["series"] if se["instances"] == 20]
    assert "lung" in head_series[0]["route_note"] and head_series[0]["state"] == "routed"

    # the newcomer's demo against the same node: phantom in, measured values next to the truth
    done = node.cli("demo", "--timeout", "180", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "lung-quant" in out and "delivered" in out and "sent to pacs: sent" in out
    assert "ct-chest-triage 1.0.0 -> skipped (model unavailable" in out
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\s*(\w+ volume)\s+(-?[\d.]+) mL\s+(-?[\d.]+) mL", out, re.M)}
    assert set(rows) == {"right volume", "left volume", "total volume"}, out
    for measured_ml, true_ml in rows.values():
        assert abs(measured_ml - true_ml) <= 0.03 * true_ml
    laa = re.search(r"total LAA-950\s+(-?[\d.]+) %\s+(-?[\d.]+) %", out)
    assert laa and abs(float(laa.group(1)) - float(laa.group(2))) <= 1.0, out
