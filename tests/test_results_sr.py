"""SR encoder: TID 1500 reports for the shared chest CT (with and without a SEG) and a DX classification."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.imaging import load_image
from node.results.common import Provenance, series_number, source_header
from node.results.seg import encode_seg
from node.results.sr import ABSENT, COMMENT, PRESENT, PROBABILITY, SUMMARY, encode_sr
from plugins.base import Classification, Code, Findings, Image, Manifest, Measurement, Segmentation, SegmentSpec
from plugins.reference_threshold import MANIFEST
from plugins.reference_threshold.model import build, write_weights
from tests.dicom_checks import assert_valid

PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName",
)  # fmt: skip
PNEUMONIA = Code(value="233604007", scheme="SCT", meaning="Pneumonia")
EFFUSION = Code(value="60046008", scheme="SCT", meaning="Pleural effusion")
CXR_MANIFEST = Manifest(
    name="cxr-test", version="0.1.0", factory="tests.none:build", modalities=["CR", "DX"],
    findings=[PNEUMONIA, EFFUSION],
    segments=[SegmentSpec(label="lung", category=Code(value="123037004", scheme="SCT", meaning="Anatomical Structure"),
                          type=Code(value="39607008", scheme="SCT", meaning="Lung"))],
)  # fmt: skip


@dataclasses.dataclass
class Case:
    image: Image
    findings: Findings
    sources: dict[str, Dataset]
    prov: Provenance
    series_uid: str

    def encode(self, tmp: Path, name: str = "sr.dcm", **kw) -> tuple[Dataset, hd.sr.Comprehensive3DSR]:
        args = dict(findings=self.findings, image=self.image, sources=self.sources, prov=self.prov)
        args |= kw
        path = tmp / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom warns about the shared CT's one-component PatientName
            sr = encode_sr(source_series_uid=self.series_uid, **args)
            sr.save_as(path)
        assert_valid(path)
        _assert_every_finding_has_a_region(sr)
        return sr, hd.sr.srread(path)


def _assert_every_finding_has_a_region(sr: Dataset) -> None:
    """What OHIF needs to show an SR at all: each tracked finding (measurement groups sharing a Tracking UID,
    which OHIF merges) has a SCOORD image region; one without stops OHIF's SR viewport."""
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    regions: dict[str, bool] = {}
    for group in measurements.ContentSequence:
        (uid,) = [i.UID for i in group.ContentSequence if i.ValueType == "UIDREF"]
        has = any(i.ValueType in ("SCOORD", "SCOORD3D") for i in group.ContentSequence)
        regions[uid] = regions.get(uid, False) or has
    assert regions and all(regions.values()), regions


def _headers(paths: list[Path]) -> dict[str, Dataset]:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


@pytest.fixture(scope="module")
def ct(ct_dir: Path, tmp_path_factory) -> Case:
    paths = sorted(ct_dir.glob("*.dcm"))
    image = load_image(paths)
    plugin = build(MANIFEST)
    plugin.load("cpu", write_weights(tmp_path_factory.mktemp("w") / "w.safetensors", 300.0))
    findings = plugin.run(image)
    sources = _headers(paths)
    return Case(image, findings, sources, Provenance(MANIFEST), str(next(iter(sources.values())).SeriesInstanceUID))


def _seg(case: Case, label: str, mask: np.ndarray) -> Dataset:
    """A plain SEG of one mask (the real SEG encoder is tested in its own module)."""
    spec = next(s for s in case.prov.manifest.segments if s.label == label)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=spec.label,
        segmented_property_category=_coded(spec.category),
        segmented_property_type=_coded(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=case.prov.manifest.name,
            version=case.prov.manifest.version,
            family=codes.cid7162.ArtificialIntelligence,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.seg.Segmentation(
            source_images=[source_header(case.sources[s.sop_instance_uid]) for s in case.image.sources],
            pixel_array=mask.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=pydicom.uid.generate_uid(),
            series_number=1,
            sop_instance_uid=pydicom.uid.generate_uid(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="0",
            device_serial_number="0",
        )


@pytest.fixture(scope="module")
def ct_seg(ct: Case) -> Dataset:
    return _seg(ct, MANIFEST.segments[0].label, ct.findings.segmentations[0].mask)


@pytest.fixture(scope="module")
def cxr(data_root: Path) -> Case:
    paths = [data_root / "cxr_nih_google_dicom" / "nih_cxr_google_sc_dx.dcm"]
    image = load_image(paths)
    findings = Findings(
        classifications=[Classification(PNEUMONIA, 0.873), Classification(EFFUSION, 0.12, threshold=0.4)],
        summary="pneumonia likely",
    )
    sources = _headers(paths)
    return Case(image, findings, sources, Provenance(CXR_MANIFEST), str(next(iter(sources.values())).SeriesInstanceUID))


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _assert_header(sr: Dataset, case: Case) -> None:
    source = next(iter(case.sources.values()))
    for keyword in PATIENT_STUDY:
        assert sr.get(keyword) == source.get(keyword), keyword
    name = case.prov.manifest.name
    assert sr.SeriesInstanceUID == case.prov.uid(case.series_uid, "SR", "series")
    assert sr.SOPInstanceUID == case.prov.uid(case.series_uid, "SR", 0)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.SeriesNumber, sr.InstanceNumber) == (series_number(name, "SR", source), 1)
    assert sr.SeriesNumber % 10000 == series_number(name, "SR")
    assert sr.SeriesNumber // 10000 == (source.SeriesNumber if "SeriesNumber" in source else 0)
    version = case.prov.manifest.version
    origin = f"{source.get('SeriesNumber', '')} {source.get('SeriesDescription', '')}".strip()
    assert sr.SeriesDescription == f"AI-generated {name} {version} SR" + (f" - src {origin}" if origin else "")
    equipment = sr.ContributingEquipmentSequence[-1]  # IHE AI Results: the algorithm
    assert (equipment.Manufacturer, equipment.ManufacturerModelName, equipment.SoftwareVersions) == (
        "radnode", name, version)
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert equipment.DeviceUID == case.prov.device_uid
    library = hd.sr.utils.find_content_items(_root(sr), name=codes.DCM.ImageLibrary)
    assert len(library) == 1
    entries = hd.sr.utils.find_content_items(library[0], value_type="IMAGE", recursive=True)
    assert {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries} == set(case.sources)
    assert sr.Manufacturer == "radnode" and sr.SoftwareVersions == case.prov.software_versions
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert set(case.sources) <= evidence


def _root(sr: Dataset) -> Dataset:
    """The SR document's root content item (the dataset itself holds it)."""
    return sr


def _device(report: hd.sr.Comprehensive3DSR) -> hd.sr.DeviceObserverIdentifyingAttributes:
    (context,) = report.content.get_observer_contexts(observer_type=codes.DCM.Device)
    return context.observer_identifying_attributes


def _algorithm(group) -> list[str]:
    """Algorithm Identification (TID 4019) of a measurement group: name, version, parameters."""
    names = (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)
    return [item.TextValue for item in group[0].ContentSequence if item.name in names]


def _texts(report: hd.sr.Comprehensive3DSR, name: hd.sr.CodedConcept) -> list[str]:
    items = hd.sr.utils.find_content_items(report.content[0], name=name, value_type="TEXT", recursive=True)
    return [item.TextValue for item in items]


def _measurements(group) -> list[tuple[hd.sr.CodedConcept, float, hd.sr.CodedConcept]]:
    return [(m.name, m.value, m.unit) for m in group.get_measurements()]


def _expected(findings: Findings, segment: str | None) -> list[tuple[hd.sr.CodedConcept, float, hd.sr.CodedConcept]]:
    return [
        (_coded(m.concept), pytest.approx(m.value), hd.sr.CodedConcept(m.unit, "UCUM", "unused"))
        for m in findings.measurements
        if m.segment == segment
    ]


def test_ct_report_without_seg_round_trips(ct: Case, tmp_path: Path) -> None:
    sr, report = ct.encode(tmp_path)
    _assert_header(sr, ct)
    root = report.content[0]
    (procedure,) = hd.sr.utils.find_content_items(root, name=codes.DCM.ProcedureReported)
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # LOINC "CT unspecified body region" (CID 100)
    device = _device(report)
    assert device.manufacturer_name == "radnode" and device.model_name == ct.prov.model_name
    assert device.serial_number == ct.prov.device_serial_number and MANIFEST.name in device.name

    # without a SEG: one planar group, the measurements on the segment's outline on its key slice
    assert report.content.get_image_measurement_groups() == []
    (group,) = report.content.get_planar_roi_measurement_groups()
    spec = MANIFEST.segments[0]
    assert group.finding_type == _coded(spec.type) and group.finding_category == _coded(spec.category)
    assert group.tracking_identifier == spec.label
    assert _algorithm(group) == [MANIFEST.name, MANIFEST.version]
    got = _measurements(group)
    assert len(ct.findings.measurements) == 2
    assert got == _expected(ct.findings, spec.label)  # CodedConcept equality ignores the meaning
    assert {u.meaning for _, _, u in got} == {"milliliter", "Hounsfield unit"}
    assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert _texts(report, SUMMARY) == [ct.findings.summary]


def test_ct_report_references_the_seg_segment(ct: Case, ct_seg: Dataset, tmp_path: Path) -> None:
    sr, report = ct.encode(tmp_path, seg=ct_seg)
    _assert_header(sr, ct)
    assert report.content.get_image_measurement_groups() == []
    # beside the SEG-referencing group, the same finding (same tracking identifier and UID: viewers merge
    # them) outlined on its key slice, without repeating the values
    (planar,) = report.content.get_planar_roi_measurement_groups()
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    mask = ct.findings.segmentations[0].mask
    key = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    assert planar.tracking_identifier == group.tracking_identifier == MANIFEST.segments[0].label
    assert planar.tracking_uid == group.tracking_uid
    assert planar.reference_type == codes.DCM.ImageRegion and planar.get_measurements() == []
    region = planar.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert region.value[0].tolist() == region.value[-1].tolist()  # closed
    referenced = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert referenced == ct.image.sources[key].sop_instance_uid
    cols, rows = np.round(region.value[:, 0] - 0.5).astype(int), np.round(region.value[:, 1] - 0.5).astype(int)
    assert mask[key][rows, cols].all()  # outline or hull: every vertex is a mask pixel of the key slice
    assert group.reference_type == codes.DCM.ReferencedSegment
    ref = group.referenced_segment
    assert ref.referenced_sop_instance_uid == ct_seg.SOPInstanceUID
    assert ref.referenced_segment_numbers == [1]
    sources = {img.referenced_sop_instance_uid for img in ref.source_images_for_segmentation}
    assert sources == {s.sop_instance_uid for s in ct.image.sources}
    assert _measurements(group) == _expected(ct.findings, MANIFEST.segments[0].label)


def test_measurement_without_segment_goes_in_a_whole_series_group(ct: Case, tmp_path: Path) -> None:
    index = Measurement(Code(value="ix", scheme="99RADNODE", meaning="Test index"), 0.42, "1")
    findings = dataclasses.replace(ct.findings, measurements=[*ct.findings.measurements, index])
    _, report = ct.encode(tmp_path, findings=findings)
    groups = {g.tracking_identifier: g for g in report.content.get_planar_roi_measurement_groups()}
    assert set(groups) == {"above-threshold", "whole series"}
    assert _measurements(groups["whole series"]) == _expected(findings, None)
    border = groups["whole series"].roi  # the border of the middle slice: made on the whole series
    rows, columns = ct.image.pixels.shape[1:]
    assert border.value.tolist() == [[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]]
    middle = ct.image.sources[len(ct.image.sources) // 2].sop_instance_uid
    assert border.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == middle


def test_measurement_site_without_mask_is_a_named_group_with_its_finding(ct: Case, ct_seg: Dataset,
                                                                        tmp_path: Path) -> None:
    """A manifest segment that only names where measurements were made (lung-quant's "both lungs") gets its
    own group with the finding type and category, beside the SEG-referencing groups."""
    site = SegmentSpec(label="both lungs", category=MANIFEST.segments[0].category,
                       type=Code(value="39607008", scheme="SCT", meaning="Lung"))
    manifest = MANIFEST.model_copy(update={"segments": [*MANIFEST.segments, site]})
    volume = Code(value="118565006", scheme="SCT", meaning="Volume")
    findings = dataclasses.replace(ct.findings, measurements=[*ct.findings.measurements,
                                                              Measurement(volume, 4321.0, "mL", "both lungs")])
    _, report = ct.encode(tmp_path, findings=findings, seg=ct_seg, prov=Provenance(manifest))
    (group,) = [g for g in report.content.get_planar_roi_measurement_groups() if g.tracking_identifier == "both lungs"]
    assert group.finding_type == _coded(site.type) and group.finding_category == _coded(site.category)
    assert _measurements(group) == _expected(findings, "both lungs")


def test_dx_classifications_round_trip(cxr: Case, tmp_path: Path) -> None:
    sr, report = cxr.encode(tmp_path)
    _assert_header(sr, cxr)
    assert all("PatientBirthDate" not in ds for ds in cxr.sources.values())  # the caller's sources stay as read
    root = report.content[0]
    (procedure,) = hd.sr.utils.find_content_items(root, name=codes.DCM.ProcedureReported)
    assert procedure.ConceptCodeSequence[0].CodeValue == "363679005"  # SCT "Imaging procedure" (CID 100)
    assert report.content.get_image_measurement_groups() == []
    groups = report.content.get_planar_roi_measurement_groups()  # made on the whole image: its border
    assert len(groups) == len(cxr.findings.classifications)
    for c, group in zip(cxr.findings.classifications, groups, strict=True):
        assert group.finding_type == _coded(c.concept)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == _coded(c.concept)
        assert evaluation.value == (PRESENT if c.positive else ABSENT)
        (probability,) = group.get_measurements()
        assert probability.name == PROBABILITY and probability.value == pytest.approx(c.probability)
        assert probability.unit.value == "1" and probability.unit.scheme_designator == "UCUM"
        assert _algorithm(group) == [CXR_MANIFEST.name, CXR_MANIFEST.version, f"threshold={c.threshold:g}"]
        rows, columns = cxr.image.pixels.shape
        assert group.roi.value.tolist() == [[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]]
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == next(iter(cxr.sources))
    assert [c.positive for c in cxr.findings.classifications] == [True, False]


def test_dx_segment_is_referenced_in_its_seg(cxr: Case, tmp_path: Path) -> None:
    mask = np.zeros(cxr.image.pixels.shape, dtype=bool)
    mask[300:700, 200:500] = True
    area = Code(value="42798000", scheme="SCT", meaning="Area")
    findings = Findings(
        segmentations=[Segmentation("lung", mask)], measurements=[Measurement(area, 1234.5, "mm2", "lung")]
    )
    seg = _seg(cxr, "lung", mask)
    _, report = cxr.encode(tmp_path, findings=findings, seg=seg)
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    (planar,) = report.content.get_planar_roi_measurement_groups()
    assert planar.tracking_identifier == "lung" and planar.tracking_uid == group.tracking_uid
    assert planar.roi.value[:, 0].min() == 200.5 and planar.roi.value[:, 1].max() == 699.5  # the mask's border
    ref = group.referenced_segment
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]
    (source,) = ref.source_images_for_segmentation
    assert source.referenced_sop_instance_uid == cxr.image.sources[0].sop_instance_uid
    assert _measurements(group) == _expected(findings, "lung")


def test_warnings_are_text_items(cxr: Case, tmp_path: Path) -> None:
    image = dataclasses.replace(cxr.image, warnings=("image cropped",))
    findings = dataclasses.replace(cxr.findings, warnings=["low contrast", "portable film"])
    _, report = cxr.encode(tmp_path, image=image, findings=findings)
    assert _texts(report, COMMENT) == ["image cropped", "low contrast", "portable film"]
    assert _texts(report, SUMMARY) == ["pneumonia likely"]


def test_uids_are_deterministic(cxr: Case, tmp_path: Path) -> None:
    first, _ = cxr.encode(tmp_path, "a.dcm")
    second, _ = cxr.encode(tmp_path, "b.dcm")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = encode_sr(cxr.findings, cxr.image, cxr.sources, cxr.prov, "1.2.3.4")
    assert other.SOPInstanceUID != first.SOPInstanceUID and other.SeriesInstanceUID != first.SeriesInstanceUID


def test_findings_it_cannot_encode_raise(cxr: Case, ct: Case, ct_seg: Dataset) -> None:
    def encode(case: Case, **kw) -> None:
        args = dict(findings=case.findings, image=case.image, sources=case.sources, prov=case.prov) | kw
        encode_sr(source_series_uid=case.series_uid, **args)

    with pytest.raises(ValueError, match="not-applicable"):
        encode(cxr, findings=Findings.not_applicable_because("not a chest"))
    with pytest.raises(ValueError, match="missing from the source datasets"):
        encode(cxr, sources={})
    with pytest.raises(ValueError, match="no source instances"):
        encode(cxr, image=dataclasses.replace(cxr.image, sources=()))
    volume = Code(value="118565006", scheme="SCT", meaning="Volume")
    with pytest.raises(ValueError, match="not declared"):
        encode(cxr, findings=Findings(measurements=[Measurement(volume, 1.0, "mL", "heart")]))
    with pytest.raises(ValueError, match="UCUM"):
        encode(cxr, findings=Findings(measurements=[Measurement(volume, 1.0, " ")]))
    with pytest.raises(ValueError, match="finite"):
        encode(cxr, findings=Findings(measurements=[Measurement(volume, float("nan"), "mL")]))
    other_study = Dataset()
    other_study.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="another study"):
        encode(ct, seg=other_study)
    relabelled = pydicom.Dataset(ct_seg)
    relabelled.SegmentSequence = [pydicom.Dataset(ct_seg.SegmentSequence[0])]
    relabelled.SegmentSequence[0].SegmentLabel = "something else"
    with pytest.raises(ValueError, match="no segment labelled"):
        encode(ct, seg=relabelled)


def test_ultrasound_area_per_frame_round_trips(data_root: Path, tmp_path: Path) -> None:
    """A US multi-frame source: one SEG segment on the frames, areas in mm2; dciodvfy-clean and equal on re-read."""
    paths = [data_root / "us_samples_pydicom" / "examples_ybr_color.dcm"]
    image = load_image(paths)
    assert image.kind == "frames"
    manifest = Manifest(
        name="us-test", version="0.2.0", factory="tests.none:build", modalities=["US"],
        findings=[Code(value="42798000", scheme="SCT", meaning="Area")],
        segments=[SegmentSpec(label="prostate", category=Code(value="123037004", scheme="SCT",
                                                              meaning="Anatomical Structure"),
                              type=Code(value="41216001", scheme="SCT", meaning="Prostate"))],
    )  # fmt: skip
    mask = np.zeros(image.pixels.shape[:3], dtype=bool)
    mask[2:5, 100:180, 150:260] = True
    area = Code(value="42798000", scheme="SCT", meaning="Area")
    per_frame = [Measurement(area, 8800.0 + k, "mm2", "prostate", frame=k) for k in (2, 3, 4)]
    findings = Findings(segmentations=[Segmentation("prostate", mask)],
                        measurements=[Measurement(area, 8800.0, "mm2", "prostate"), *per_frame],
                        warnings=["probe gain high"])
    sources = _headers(paths)
    case = Case(image, findings, sources, Provenance(manifest), str(next(iter(sources.values())).SeriesInstanceUID))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = encode_seg(findings, image, sources, case.prov, case.series_uid)  # the SEG on the frames it covers
    sr, report = case.encode(tmp_path, seg=seg)
    _assert_header(sr, case)
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert _measurements(group) == [_expected(findings, "prostate")[0]]  # the whole-segment area only
    assert report.content.get_image_measurement_groups() == []
    frames = [g for g in report.content.get_planar_roi_measurement_groups() if "frame" in g.tracking_identifier]
    assert len(frames) == 3  # one group per frame, its region the outline on that frame
    for k, group in zip((2, 3, 4), frames, strict=True):
        assert group.tracking_identifier == f"prostate, frame {k + 1}"
        src = group.roi.ContentSequence[0]
        assert src.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.sources[k].sop_instance_uid
        assert src.ReferencedSOPSequence[0].ReferencedFrameNumber == image.sources[k].frame_number
        ((name, value, unit),) = _measurements(group)
        assert value == pytest.approx(8800.0 + k) and unit.value == "mm2"
        assert group.finding_type == _coded(manifest.segments[0].type)
    assert "probe gain high" in _texts(report, COMMENT)


def test_outline_traces_one_part_and_hulls_several() -> None:
    from node.results.sr import outline_polyline

    assert outline_polyline(np.zeros((8, 8), bool)) is None
    ring = np.zeros((20, 20), bool)
    ring[4:15, 3:12] = True
    ring[8:11, 6:9] = False  # a hole: filled, the outline is the outer boundary
    points = outline_polyline(ring)
    assert points[0].tolist() == points[-1].tolist()
    cols, rows = (points[:, 0] - 0.5).astype(int), (points[:, 1] - 0.5).astype(int)
    assert ring[rows, cols].all()
    assert {(c, r) for c, r in zip(cols.tolist(), rows.tolist(), strict=True)} == {
        (c, r) for r in range(4, 15) for c in range(3, 12) if r in (4, 14) or c in (3, 11)}  # every border pixel
    pixel = np.zeros((5, 5), bool)
    pixel[2, 3] = True
    assert outline_polyline(pixel).tolist() == [[3, 2], [4, 2], [4, 3], [3, 3], [3, 2]]  # its square
    two = np.zeros((20, 40), bool)
    two[5:15, 2:10] = two[5:15, 25:35] = True
    two[0, 39] = True  # a speck under a tenth of the largest part: ignored
    hull = outline_polyline(two)
    assert hull[:, 0].min() == 2.5 and hull[:, 0].max() == 34.5 and hull[:, 1].min() == 5.5
    long = np.zeros((400, 400), bool)
    long[50:350, 50:350] = True
    assert len(outline_polyline(long, max_points=64)) <= 64
