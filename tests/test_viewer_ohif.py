"""Issue 13, results a radiologist can actually see: radnode's outputs opened in a real OHIF viewer.

Three plugins, each study in one real Orthanc over REST, read by the prebuilt OHIF app (npm @ohif/app, pinned in
tests/ohif.py) over DICOMweb in headless Chromium:

- chest CT: `radnode infer --plugin lung-quant` on the shared CT -> SEG, SR, SC;
- X-ray: cxr-pneumonia (tiny generated weights, tests/result_cases.py) on the NEMA CR -> SR (a classification on
  the image border), SC heatmap;
- ultrasound: us-prostate-seg (tiny weights, stand-in network, tests/result_cases.py) on a 2-frame US -> SEG,
  SR (per-frame areas), SC heatmap and outline SCs.

Screenshots and the browser console go to $RADNODE_TEST_ARTEFACTS/<test name>/ (default: the test's tmp_path).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import need
from tests.ohif import OhifServer, SrStep, Viewer, artefact_dir, colour_fraction, coloured_fraction, install_ohif
from tests.orthanc import Orthanc
from tests.result_cases import CXR_FILE, US_FILE, cxr_case, make_cxr_case, result_work, us_case  # noqa: F401

pytestmark = pytest.mark.slow
# cxr_case, us_case above: session fixtures (each case is made once per session, whichever module asks first)


def _series_description(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesDescription", ""))


def _case_study(pacs, sources: list[Path], outputs: list[Path], sr: Path | None = None) -> SimpleNamespace:
    """Upload a source series and radnode's outputs for it (one study) to the test Orthanc."""
    study_id = pacs.orthanc.upload(sorted(sources) + sorted(outputs))
    assert len(pacs.orthanc.get(f"/studies/{study_id}/instances")) == len(sources) + len(outputs)
    return SimpleNamespace(uid=str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID),
                           orthanc=pacs.orthanc, server=pacs.server, sources=sources, outputs=outputs,
                           sr_path=sr, sr=_series_description(sr) if sr else None)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A running Orthanc, and the OHIF app served on top of it; the studies below are uploaded as needed."""
    dist = install_ohif()
    orthanc = Orthanc(tmp_path_factory.mktemp("ohif-orthanc"), radnode_port=11112).start()
    server = None
    try:
        server = OhifServer(dist, orthanc.url).start()
        yield SimpleNamespace(orthanc=orthanc, server=server)
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def study(pacs, tmp_path_factory, ct_dir: Path):
    """lung-quant's outputs for the shared CT (`radnode infer`), with the CT, in the test Orthanc."""
    need(ct_dir.is_dir(), f"shared chest CT not found at {ct_dir}")
    root = tmp_path_factory.mktemp("ohif-ct")
    out = root / "lung-quant"
    env = {**os.environ, "RADNODE_DATA_DIR": str(root / "data"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "node.cli", "infer", str(ct_dir), "--plugin", "lung-quant",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    outputs = {p.name: p for p in out.glob("*.dcm")}
    assert {"SEG.dcm", "SR.dcm"} <= set(outputs) and any(n.startswith("SC-") for n in outputs), sorted(outputs)
    found = _case_study(pacs, sorted(ct_dir.glob("*.dcm")), sorted(outputs.values()), outputs["SR.dcm"])
    found.outputs = outputs
    found.findings = json.loads((out / "findings.json").read_text()) if (out / "findings.json").is_file() else {}
    found.seg = _series_description(outputs["SEG.dcm"])
    found.sc = _series_description(next(p for n, p in sorted(outputs.items()) if n.startswith("SC-")))
    return found


@pytest.fixture(scope="module")
def cr_study(pacs, data_root: Path, tmp_path_factory):
    """cxr-pneumonia's SR and SC for the NEMA CR, with the CR, in the test Orthanc: the CR as a new study (its own
    UIDs, patient ID) without its Pixel Spacing of 0.000\\0.000 (OHIF draws such an image black and cannot place
    annotations on it: see the zero-spacing test below); radnode makes the same of it (spacing unknown either way)."""
    need((data_root / CXR_FILE).is_file(), f"NEMA CR not found at {data_root / CXR_FILE}")
    root = tmp_path_factory.mktemp("ohif-cr")
    cr = pydicom.dcmread(data_root / CXR_FILE)
    assert [float(x) for x in cr.PixelSpacing] == [0.0, 0.0]
    del cr.PixelSpacing
    cr.PatientID = f"{cr.PatientID}-ohif"
    cr.StudyInstanceUID, cr.SeriesInstanceUID, cr.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    cr.file_meta.MediaStorageSOPInstanceUID = cr.SOPInstanceUID
    (root / "data" / CXR_FILE).parent.mkdir(parents=True)
    cr.save_as(root / "data" / CXR_FILE)
    case = make_cxr_case(root / "data", root / "work")
    assert case.sr is not None and case.scs and case.seg is None, case.dicom_outputs
    found = _case_study(pacs, case.sources, case.dicom_outputs, case.sr)
    found.case, found.sc = case, _series_description(case.scs[0])
    return found


@pytest.fixture(scope="module")
def cr_zero_spacing_study(pacs, data_root: Path, request):
    """The same run on the NEMA CR as it is (Pixel Spacing 0.000\\0.000), in the test Orthanc."""
    need((data_root / CXR_FILE).is_file(), f"NEMA CR not found at {data_root / CXR_FILE}")
    case = request.getfixturevalue("cxr_case")
    found = _case_study(pacs, case.sources, case.dicom_outputs, case.sr)
    found.case = case
    return found


@pytest.fixture(scope="module")
def us_study(pacs, data_root: Path, request):
    """us-prostate-seg's SEG, SR and SCs for the 2-frame US, with the US, in the test Orthanc."""
    need((data_root / US_FILE).is_file(), f"US sample not found at {data_root / US_FILE}")
    case = request.getfixturevalue("us_case")
    assert case.seg is not None and case.sr is not None and len(case.scs) >= 2, case.dicom_outputs
    found = _case_study(pacs, case.sources, case.dicom_outputs, case.sr)
    found.case, found.seg = case, _series_description(case.seg)
    found.sc = _series_description(case.scs[0])
    return found


@pytest.fixture
def viewer(pacs, request, tmp_path: Path):
    with Viewer(pacs.server, artefact_dir(tmp_path, request.node.name)) as v:
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


def _finding_images(sr_path: Path) -> list[str]:
    """Per finding (Tracking Unique Identifier, in the order of _ohif_text), the image OHIF jumps to for it: the one
    its first SCOORD is on, as the end of a WADO-RS image id ("/instances/<SOP Instance UID>/frames/<n>")."""
    images: dict[str, str | None] = {}
    root = pydicom.dcmread(sr_path)
    measurements = next(i for i in root.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    for group in measurements.ContentSequence:
        content = list(group.get("ContentSequence", []))
        uid = next(str(i.UID) for i in content if i.ValueType == "UIDREF")
        images.setdefault(uid, None)
        scoord = next((i for i in content if i.ValueType == "SCOORD"), None)
        if scoord is not None and images[uid] is None:
            ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
            images[uid] = f"/instances/{ref.ReferencedSOPInstanceUID}/frames/{int(ref.get('ReferencedFrameNumber', 1))}"
    return list(images.values())


def _step_through_measurements(viewer: Viewer, sr_path: Path) -> list[SrStep]:
    """With the SR open (OHIF shows its first measurement), click the SR viewport's ">" once per finding, back to
    the first; a screenshot of each. Checks that each step shows its finding's text on its image with an outline,
    nothing else but the SR's findings, no error; returns the steps."""
    expected, images = _ohif_text(sr_path), _finding_images(sr_path)
    steps = [viewer.measurement_shown()]
    viewer.screenshot("measurement-1")
    for k in range(len(expected)):
        steps.append(viewer.step_measurement(+1))
        viewer.screenshot(f"measurement-{(k + 1) % len(expected) + 1}" + ("-again" if k + 1 == len(expected) else ""))
        viewer.check_no_error(f"measurement {k + 2}")
    for k, step in enumerate(steps):
        finding = k % len(expected)
        assert expected[finding] in step.annotations, (finding, step, expected)
        assert step.image_id.endswith(images[finding]), (finding, step.image_id, images[finding])
        assert all(lines in expected for lines in step.annotations), (step, expected)
        assert step.outlines >= len(step.annotations) and step.misplaced == 0, step  # an outline for each text
    shown = [lines for step in steps for lines in step.annotations]
    assert all(lines in shown for lines in expected)
    assert viewer.console_errors() == []
    return steps


def test_ohif_shows_the_lung_quant_measurements(study, viewer):
    """The SR opens without an error, draws an outline and writes the group's values beside it (OHIF 3.13 shows
    nothing of an SR with a measurement group that has no 2-D SCOORD: it throws reading 'ReferencedSOPSequence');
    its ">" arrow steps through every finding, each on its key slice with its values."""
    viewer.open_study(study.uid)
    sr = viewer.open_sr(study.sr)
    assert sr.crashed == [], sr.crashed
    assert sr.shapes > 0 and sr.annotations, sr
    expected = _ohif_text(study.outputs["SR.dcm"])
    for lines in sr.annotations:
        assert lines in expected, (lines, expected)
    assert any(line.startswith("Volume: ") for line in sr.lines), sr
    steps = _step_through_measurements(viewer, study.outputs["SR.dcm"])
    assert len({step.image for step in steps}) > 1  # the findings' key slices differ: it did jump


# --- X-ray: cxr-pneumonia on the NEMA CR --------------------------------------------------------------------------


def test_ohif_shows_the_cr_classification_and_heatmap(cr_study, viewer):
    """The SR opens without an error and draws the classification on the image border with its probability
    ("Probability: 0.47 1"); the SC heatmap shows in colour."""
    viewer.open_study(cr_study.uid)
    thumbnails = "\n".join(viewer.thumbnails())
    assert cr_study.sr in thumbnails and cr_study.sc in thumbnails, thumbnails
    expected = _ohif_text(cr_study.sr_path)
    assert len(expected) == 1 and expected[0][0].startswith("Probability: "), expected
    sr = viewer.open_sr(cr_study.sr)
    assert sr.crashed == [] and sr.misplaced == 0, sr
    assert sr.annotations == expected and sr.shapes >= 2, sr  # the border outline and the line to its text
    step = viewer.measurement_shown()
    assert step.image_id.endswith(_finding_images(cr_study.sr_path)[0]) and step.outlines == 1, step
    viewer.check_no_error("CR SR")
    viewer.double_click_thumbnail(cr_study.sc)
    viewer.wait(lambda: coloured_fraction(viewer.viewport_pixels()) > 0.05, 60, "the CR heatmap SC in colour")
    viewer.screenshot("sc")
    viewer.check_no_error("CR SC")
    assert viewer.console_errors() == []
    assert viewer.foreign_requests() == []


def test_ohif_3_13_cannot_place_annotations_on_a_cr_with_zero_pixel_spacing(cr_zero_spacing_study, viewer):
    """Characterises the pinned OHIF with the NEMA CR as it is (Pixel Spacing 0.000\\0.000): it draws the CR black
    and computes NaN coordinates for the SR's outline and text: no outline, the text box in the viewport's top-left
    corner (its NaN transform ignored), console errors "<polyline> attribute points: Expected number"; no error
    page. Not radnode's outputs: the same CR without the zero spacing shows with its classification (test above).
    When this fails, OHIF copes with such an image."""
    source = pydicom.dcmread(cr_zero_spacing_study.sources[0], stop_before_pixels=True)
    assert [float(x) for x in source.PixelSpacing] == [0.0, 0.0]
    viewer.open_study(cr_zero_spacing_study.uid, rendered=False)
    sr = viewer.open_sr(cr_zero_spacing_study.sr)
    assert sr.crashed == [] and sr.annotations == [] and sr.misplaced >= 2, sr
    assert not viewer.viewport_rendered()
    assert any("Expected number" in e for e in viewer.console_errors())


# --- ultrasound: us-prostate-seg on a 2-frame US ----------------------------------------------------------------


def test_ohif_shows_the_us_areas_on_their_frames(us_study, viewer):
    """The SR opens without an error; its ">" arrow steps through every finding (the prostate segment, then its
    area on each frame), each on its frame with "Area: ... mm2" beside its outline."""
    viewer.open_study(us_study.uid)
    sr = viewer.open_sr(us_study.sr)
    assert sr.crashed == [] and sr.annotations, sr
    expected = _ohif_text(us_study.sr_path)
    assert expected and all(len(lines) == 1 and lines[0].startswith("Area: ") and lines[0].endswith(" mm2")
                            for lines in expected), expected
    steps = _step_through_measurements(viewer, us_study.sr_path)
    frames = pydicom.dcmread(us_study.sources[0], stop_before_pixels=True).NumberOfFrames
    assert {step.image for step in steps} == set(range(int(frames)))  # an area on every frame


def test_ohif_shows_the_us_heatmap_and_outline_captures(us_study, viewer):
    """The SC series (heatmap, then one outline SC per frame): each image shows in colour; an outline SC shows its
    outline in the segment's colour."""
    scs = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in us_study.case.scs}
    kinds = {uid: str(pydicom.dcmread(p, stop_before_pixels=True).DerivationDescription).split()[0]
             for uid, p in scs.items()}
    assert sorted(set(kinds.values())) == ["Heatmap", "Outline"], kinds
    viewer.open_study(us_study.uid)
    viewer.double_click_thumbnail(us_study.sc)
    viewer.wait(lambda: (viewer.current_image() or (0, ""))[1].split("/instances/")[-1].split("/")[0] in scs, 60,
                "the SC series in the viewport")
    seen: dict[str, float] = {}
    for k in range(len(scs)):
        if k:
            viewer.next_image()
        viewer.wait(viewer.viewport_rendered, 30, f"SC image {k + 1} to render")
        uid = viewer.current_image()[1].split("/instances/")[1].split("/")[0]
        pixels = viewer.viewport_pixels()
        viewer.screenshot(f"sc-{k + 1}-{kinds[uid].lower()}")
        if kinds[uid] == "Heatmap":
            seen[uid] = coloured_fraction(pixels)
            assert seen[uid] > 0.005, (uid, seen[uid])
        else:
            seen[uid] = colour_fraction(pixels, _outline_colour(scs[uid]))
            assert seen[uid] > 0.0003, (uid, seen[uid])
    assert set(seen) == set(scs), (seen, kinds)
    viewer.check_no_error("US SCs")
    assert viewer.console_errors() == []


def _outline_colour(sc_path: Path) -> tuple[int, int, int]:
    """The colour an outline SC draws its segment in: its commonest clearly coloured pixel value (the outline and
    the legend's swatch; the source's own colours are scattered over many values)."""
    rgb = pydicom.dcmread(sc_path).pixel_array.reshape(-1, 3).astype(np.int16)
    coloured = rgb[(rgb.max(axis=1) - rgb.min(axis=1)) > 100]
    (colour, _), = collections.Counter(map(tuple, coloured.tolist())).most_common(1)
    return tuple(int(c) for c in colour)


def test_ohif_3_13_cannot_open_a_seg_without_frame_of_reference(us_study, viewer):
    """Characterises the pinned OHIF: a SEG of an image without patient geometry (an US: no Frame of Reference, so
    no Pixel Measures, Plane Position or Orientation functional groups, which PS3.3 A.51.5 then leaves out: each
    frame maps to its source frame through Derivation Image) makes its SEG viewport throw ("Cannot destructure
    property 'SpacingBetweenSlices' of 'PixelMeasures'"): the route's error boundary replaces the whole viewer.
    Reopening the study brings everything else back (OHIF loads a SEG only when asked). When this fails, OHIF
    changed: see whether it now overlays such a SEG."""
    seg = pydicom.dcmread(us_study.case.seg, stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in seg
    assert not any("PixelMeasuresSequence" in g for g in seg.SharedFunctionalGroupsSequence)
    viewer.open_study(us_study.uid)
    assert us_study.seg in "\n".join(viewer.thumbnails())
    viewer.double_click_thumbnail(us_study.seg)
    deadline = time.monotonic() + 30
    while not viewer.boundary_errors() and not viewer.hydrate_prompt() and time.monotonic() < deadline:
        time.sleep(0.5)
    viewer.screenshot("seg")
    crashed = viewer.boundary_errors()
    assert any("'SpacingBetweenSlices' of 'PixelMeasures'" in e for e in crashed), (crashed, viewer.hydrate_prompt())
    assert "Something went wrong" in viewer.body_text()
    # the rest of the app: the study, its SR and its SCs, after reopening it
    viewer.open_study(us_study.uid)
    viewer.check_no_error("US study reopened after the SEG")
    sr = viewer.open_sr(us_study.sr)
    assert sr.crashed == [] and sr.annotations and sr.misplaced == 0, sr
    viewer.double_click_thumbnail(us_study.sc)
    viewer.wait(lambda: coloured_fraction(viewer.viewport_pixels()) > 0.005, 60, "the US heatmap SC")
    viewer.screenshot("after-reopening")
    viewer.check_no_error("US SC after reopening")


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
