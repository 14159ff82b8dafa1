"""Issue 13, results a radiologist can actually see: radnode's outputs opened in a real OHIF viewer.

`radnode infer --plugin lung-quant` on the shared chest CT; the CT and its SEG/SR/SC go into a real Orthanc over REST;
the prebuilt OHIF app (npm @ohif/app, pinned in tests/ohif.py) reads them over DICOMweb in headless Chromium.
Screenshots and the browser console go to $RADNODE_TEST_ARTEFACTS/<test name>/ (default: the test's tmp_path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from tests.conftest import need
from tests.ohif import OhifServer, Viewer, artefact_dir, coloured_fraction, install_ohif
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow

def _series_description(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesDescription", ""))


@pytest.fixture(scope="module")
def study(tmp_path_factory, ct_dir: Path):
    """lung-quant's outputs for the shared CT, with the CT, in a running Orthanc; and the OHIF app served on top."""
    need(ct_dir.is_dir(), f"shared chest CT not found at {ct_dir}")
    dist = install_ohif()
    root = tmp_path_factory.mktemp("ohif")
    out = root / "lung-quant"
    env = {**os.environ, "RADNODE_DATA_DIR": str(root / "data"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "node.cli", "infer", str(ct_dir), "--plugin", "lung-quant",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    outputs = {p.name: p for p in out.glob("*.dcm")}
    assert {"SEG.dcm", "SR.dcm"} <= set(outputs) and any(n.startswith("SC-") for n in outputs), sorted(outputs)

    orthanc = Orthanc(root / "orthanc", radnode_port=11112).start()
    server = None
    try:
        sources = sorted(ct_dir.glob("*.dcm"))
        study_id = orthanc.upload(sources + sorted(outputs.values()))
        assert len(orthanc.get(f"/studies/{study_id}/instances")) == len(sources) + len(outputs)
        server = OhifServer(dist, orthanc.url).start()
        yield SimpleNamespace(
            uid=str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID),
            orthanc=orthanc, server=server, outputs=outputs,
            findings=json.loads((out / "findings.json").read_text()) if (out / "findings.json").is_file() else {},
            sr=_series_description(outputs["SR.dcm"]), seg=_series_description(outputs["SEG.dcm"]),
            sc=_series_description(next(p for n, p in sorted(outputs.items()) if n.startswith("SC-"))),
        )
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


@pytest.fixture
def viewer(study, request, tmp_path: Path):
    with Viewer(study.server, artefact_dir(tmp_path, request.node.name)) as v:
        yield v


def test_ohif_opens_the_study_with_every_result_series(study, viewer):
    viewer.open_study(study.uid)
    viewer.screenshot("study")
    thumbnails = "\n".join(viewer.thumbnails())
    for description in (study.sr, study.seg, study.sc):
        assert description in thumbnails, thumbnails
    viewer.check_no_error("study")
    assert viewer.foreign_requests() == []


def test_ohif_overlays_the_lung_segmentation(study, viewer):
    seg = pydicom.dcmread(study.outputs["SEG.dcm"], stop_before_pixels=True)
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert "left lung" in labels, labels
    viewer.open_study(study.uid)
    assert viewer.open_seg(study.seg) == labels
    viewer.select_segment("left lung")  # jumps to the slice at the segment's centre
    viewer.screenshot("seg-left-lung")
    assert viewer.overlay_fraction() > 0.01  # the left lung covers well over 1 % of a mid-chest slice
    viewer.check_no_error("segmentation")


def test_ohif_shows_the_secondary_capture(study, viewer):
    viewer.open_study(study.uid)
    viewer.double_click_thumbnail(study.sc)
    viewer.wait(lambda: viewer.viewport_rendered() and coloured_fraction(viewer.viewport_pixels()) > 0.005, 60,
                "the SC heatmap to render in colour")
    viewer.screenshot("sc")
    viewer.check_no_error("secondary capture")


def _ohif_text(sr_path: Path) -> list[list[str]]:
    """The text OHIF 3.13 writes beside each planar measurement of a TID 1500 SR: per Tracking Unique Identifier
    (groups with the same one are merged), "<NUM concept meaning>: <value, 2 decimals> <UCUM code>" for each NUM,
    then "363698007: <finding site>"; at most 5 lines; a value of 0 is shown empty."""
    items: dict[str, list[str]] = {}
    sites: dict[str, list[str]] = {}
    root = pydicom.dcmread(sr_path)
    measurements = next(i for i in root.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    for group in measurements.ContentSequence:
        content = list(group.get("ContentSequence", []))
        uid = next(str(i.UID) for i in content if i.ValueType == "UIDREF")
        for i in content:
            if i.ValueType == "NUM" and i.get("MeasuredValueSequence"):
                value = i.MeasuredValueSequence[0]
                number = f"{float(value.NumericValue):.2f}" if float(value.NumericValue) else ""
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                items.setdefault(uid, []).append(f"{i.ConceptNameCodeSequence[0].CodeMeaning}: {number} {unit}")
            elif i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "363698007":
                sites.setdefault(uid, []).append(f"363698007: {i.ConceptCodeSequence[0].CodeMeaning}")
            else:
                items.setdefault(uid, [])
    return [(lines + sites.get(uid, [])[:1])[:5] for uid, lines in items.items()]


def test_ohif_shows_the_lung_quant_measurements(study, viewer):
    """The SR opens without an error, draws an outline and writes the group's values beside it (OHIF 3.13 shows
    nothing of an SR with a measurement group that has no 2-D SCOORD: it throws reading 'ReferencedSOPSequence')."""
    viewer.open_study(study.uid)
    sr = viewer.open_sr(study.sr)
    assert sr.crashed == [], sr.crashed
    assert sr.shapes > 0 and sr.annotations, sr
    expected = _ohif_text(study.outputs["SR.dcm"])
    for lines in sr.annotations:
        assert lines in expected, (lines, expected)
    assert any(line.startswith("Volume: ") for line in sr.lines), sr


# --- which TID 1500 encodings this OHIF shows: small SRs built with highdicom over the same CT ------------------------


def _report(ct_dir: Path, out: Path, name: str, groups) -> Path:
    """A Comprehensive 3D SR (TID 1500) with `groups`, a new series in the CT's study, described "OHIF <name>"."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct_dir.glob("*.dcm"))]
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="radnode test")))
    report = hd.sr.MeasurementReport(observation_context=context, imaging_measurements=groups,
                                     procedure_reported=CodedConcept("25045-6", "LN", "CT unspecified body region"))
    sr = hd.sr.Comprehensive3DSR(evidence=sources, content=report[0], series_instance_uid=hd.UID(), series_number=990,
                                 sop_instance_uid=hd.UID(), instance_number=1, manufacturer="radnode test",
                                 series_description=f"OHIF {name}", is_complete=True, is_final=True)
    path = out / f"{name}.dcm"
    sr.save_as(path)
    return path


def _groups(ct_dir: Path):
    """(a planar ROI group: a closed POLYLINE on one slice + Area + probability; a group without coordinates)."""
    import highdicom as hd
    import numpy as np
    from highdicom.sr import CodedConcept

    ct = pydicom.dcmread(sorted(ct_dir.glob("*.dcm"))[32], stop_before_pixels=True)
    unit = {"cm2": CodedConcept("cm2", "UCUM", "square centimeter"), "1": CodedConcept("1", "UCUM", "no units")}
    area = hd.sr.Measurement(name=CodedConcept("42798000", "SCT", "Area"), value=1.6, unit=unit["cm2"])
    probability = hd.sr.Measurement(name=CodedConcept("RID49505", "RADLEX", "Probability"), value=0.87, unit=unit["1"])
    square = np.array([(180, 200), (220, 200), (220, 240), (180, 240), (180, 200)], dtype=float)
    planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="nodule 1"),
        referenced_region=hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=square,
                                            source_image=hd.sr.SourceImageForRegion(ct.SOPClassUID, ct.SOPInstanceUID)),
        finding_type=CodedConcept("27925004", "SCT", "Nodule"), measurements=[area, probability])
    coordinateless = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="pneumonia"),
        finding_type=CodedConcept("233604007", "SCT", "Pneumonia"), measurements=[probability],
        source_images=[hd.sr.SourceImageForMeasurementGroup(ct.SOPClassUID, ct.SOPInstanceUID)])
    return planar, coordinateless


def test_ohif_draws_a_planar_roi_group_with_its_values(study, viewer, ct_dir: Path, tmp_path: Path):
    planar, _ = _groups(ct_dir)
    study.orthanc.upload([_report(ct_dir, tmp_path, "planar", [planar])])
    viewer.open_study(study.uid)
    sr = viewer.open_sr("OHIF planar")
    assert sr.crashed == []
    assert sr.shapes > 0 and sr.lines == ["Area: 1.60 cm2", "Probability: 0.87 1"], sr
    assert sr.hydrate_prompt  # a 5-point DCM 111030 POLYLINE is a RectangleROI to OHIF: it offers to track it


@pytest.mark.parametrize("mixed", [False, True], ids=["alone", "with-a-planar-group"])
def test_ohif_3_13_fails_on_a_group_without_coordinates(study, viewer, ct_dir: Path, tmp_path: Path, mixed: bool):
    """Characterises the pinned OHIF: when this fails, OHIF changed and issue 13's encoding rule can be revisited."""
    planar, coordinateless = _groups(ct_dir)
    name = "coordinateless-mixed" if mixed else "coordinateless"
    study.orthanc.upload([_report(ct_dir, tmp_path, name, [planar, coordinateless] if mixed else [coordinateless])])
    viewer.open_study(study.uid)
    sr = viewer.open_sr(f"OHIF {name}")
    assert any("reading 'ReferencedSOPSequence'" in e for e in sr.crashed), sr
    assert sr.shapes == 0 and sr.lines == []  # not even the planar group is drawn
