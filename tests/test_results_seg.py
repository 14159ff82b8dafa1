"""SEG encoder: valid DICOM (dciodvfy, strict re-read), masks and frame geometry round-trip through highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.imaging import load_image
from node.results.common import Provenance, series_number
from node.results.seg import FALLBACK_COLOURS, SEGMENT_COLOURS, encode_seg, segment_colours
from plugins.base import Code, Findings, Manifest, Segmentation, SegmentSpec
from plugins.reference_threshold import MANIFEST
from plugins.reference_threshold.model import build, write_weights
from tests.dicom_checks import assert_valid
from tests.synthetic import write_ct_series

TOY = Manifest(
    name="toy-seg",
    version="0.1",
    factory="toy.model:build",
    modalities=["CR", "DX", "US"],
    outputs=["SEG"],
    segments=[
        SegmentSpec(
            label="lesion",
            category=Code(value="49755003", scheme="SCT", meaning="Morphologically Altered Structure"),
            type=Code(value="52988006", scheme="SCT", meaning="Lesion"),
        )
    ],
)


def _sources(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}


def _write(seg: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    seg.save_as(path, enforce_file_format=True)
    return assert_valid(path)


def _check_geometry(path: Path, image, sources, mask: np.ndarray) -> None:
    """Segment 1 read back equals the mask (source order); each frame references its slice and position."""
    seg = hd.seg.segread(path)
    order = [s.sop_instance_uid for s in image.sources]
    assert {u for _, _, u in seg.get_source_image_uids()} == set(order)
    recovered = seg.get_pixels_by_source_instance(order, segment_numbers=[1], skip_overlap_checks=True)[..., 0]
    assert np.array_equal(recovered.astype(bool), mask)
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)


@pytest.fixture(scope="module")
def chest(ct_dir: Path, tmp_path_factory):
    paths = sorted(ct_dir.glob("*.dcm"))
    image = load_image(paths)
    plugin = build(MANIFEST)
    plugin.load("cpu", write_weights(tmp_path_factory.mktemp("w") / "w.safetensors", 300.0))
    return image, _sources(paths), plugin.run(image)


def test_chest_ct_round_trip(chest, tmp_path: Path):
    image, sources, findings = chest
    series_uid = str(next(iter(sources.values())).SeriesInstanceUID)
    prov = Provenance(MANIFEST)
    ds = _write(encode_seg(findings, image, sources, prov, series_uid), tmp_path / "seg.dcm")
    assert ds.SegmentationType == "BINARY"
    assert ds.SeriesInstanceUID == prov.uid(series_uid, "SEG", "series")
    assert ds.SOPInstanceUID == prov.uid(series_uid, "SEG", 0)
    first = sources[image.sources[0].sop_instance_uid]
    assert ds.SeriesDescription == f"AI-generated reference-threshold 1.0.0 SEG - src {first.SeriesNumber} " \
                                   f"{first.SeriesDescription}".strip()[:64]
    assert ds.SeriesNumber == series_number("reference-threshold", "SEG", first) and ds.SeriesNumber > 10000
    assert ds.PatientID == next(iter(sources.values())).PatientID
    assert "ContentCreatorName" in ds and not ds.ContentCreatorName  # Type 2: no person made it
    equipment = ds.ContributingEquipmentSequence[-1]
    assert (equipment.ManufacturerModelName, equipment.DeviceUID) == ("reference-threshold", prov.device_uid)
    segment = ds.SegmentSequence[0]
    bone = hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[("SCT", "272673000")]).value
    assert tuple(segment.RecommendedDisplayCIELabValue) == tuple(bone)
    assert segment.SegmentLabel == "above-threshold" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "272673000"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("reference-threshold", "1.0.0")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    _check_geometry(tmp_path / "seg.dcm", image, sources, findings.segmentations[0].mask)


def test_deterministic_uids(chest):
    image, sources, findings = chest
    a, b = (encode_seg(findings, image, sources, Provenance(MANIFEST), "1.2.3") for _ in range(2))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_mask_on_some_slices_has_no_frame_shift(tmp_path: Path):
    paths = write_ct_series(tmp_path / "ct", slices=12, size=64)
    image = load_image(paths)
    sources = _sources(paths)
    mask = np.zeros(image.pixels.shape, dtype=bool)
    mask[3, 10:20, 10:20] = True
    mask[7, 30:40, 5:15] = True
    mask[8, 0:4, 0:4] = True
    findings = Findings(segmentations=[Segmentation("above-threshold", mask)])
    ds = _write(encode_seg(findings, image, sources, Provenance(MANIFEST), "1.2.3"), tmp_path / "seg.dcm")
    assert ds.NumberOfFrames == 3
    _check_geometry(tmp_path / "seg.dcm", image, sources, mask)


@pytest.mark.parametrize("name", ["cxr_nema_wg04_rg1/RG1_J2KI.dcm", "cxr_nih_google_dicom/nih_cxr_google_sc_dx.dcm"])
def test_xray_image2d(data_root: Path, tmp_path: Path, name: str):
    path = data_root / name
    image = load_image([path])
    assert image.kind == "image2d"
    mask = np.zeros(image.pixels.shape, dtype=bool)
    mask[400:900, 300:800] = True
    sources = _sources([path])
    ds = _write(
        encode_seg(Findings(segmentations=[Segmentation("lesion", mask)]), image, sources, Provenance(TOY), "1.2"),
        tmp_path / "seg.dcm",
    )
    assert ds.NumberOfFrames == 1
    ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == image.sources[0].sop_instance_uid
    recovered = hd.seg.segread(tmp_path / "seg.dcm").get_pixels_by_source_instance(
        [image.sources[0].sop_instance_uid], segment_numbers=[1]
    )
    assert np.array_equal(recovered[0, ..., 0].astype(bool), mask)


def test_us_multiframe_references_the_frames(data_root: Path, tmp_path: Path):
    path = data_root / "us_samples_pydicom" / "examples_ybr_color.dcm"
    image = load_image([path])
    assert image.kind == "frames" and len(image.sources) == 30
    mask = np.zeros(image.pixels.shape[:3], dtype=bool)
    mask[4, 50:100, 60:120] = True
    mask[9, 20:40, 20:40] = True
    sources = _sources([path])
    ds = _write(
        encode_seg(Findings(segmentations=[Segmentation("lesion", mask)]), image, sources, Provenance(TOY), "1.2"),
        tmp_path / "seg.dcm",
    )
    refs = [item.DerivationImageSequence[0].SourceImageSequence[0] for item in ds.PerFrameFunctionalGroupsSequence]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [5, 10]
    assert {r.ReferencedSOPClassUID for r in refs} == {sources[image.sources[0].sop_instance_uid].SOPClassUID}
    # the source is JPEG baseline: lossy, and the method is named (PixelMed requires it with "01")
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    frames = np.asarray(seg.get_stored_frame(1)), np.asarray(seg.get_stored_frame(2))
    assert np.array_equal(frames[0].astype(bool), mask[4]) and np.array_equal(frames[1].astype(bool), mask[9])


def test_no_segmentations_gives_none(chest):
    image, sources, _ = chest
    assert encode_seg(Findings(), image, sources, Provenance(MANIFEST), "1.2.3") is None


def test_mask_shape_mismatch_raises(chest):
    image, sources, _ = chest
    bad = Findings(segmentations=[Segmentation("above-threshold", np.zeros((2, 4, 4), dtype=bool))])
    with pytest.raises(ValueError, match="shape"):
        encode_seg(bad, image, sources, Provenance(MANIFEST), "1.2.3")


def test_undeclared_segment_and_missing_source_raise(chest):
    image, sources, findings = chest
    mask = findings.segmentations[0].mask
    with pytest.raises(ValueError, match="not declared"):
        encode_seg(Findings(segmentations=[Segmentation("nope", mask)]), image, sources, Provenance(MANIFEST), "1")
    partial = dict(list(sources.items())[1:])
    with pytest.raises(ValueError, match="not given"):
        encode_seg(findings, image, partial, Provenance(MANIFEST), "1")


def test_segment_colours_are_fixed_per_type_and_distinct_within_a_seg():
    def spec(value: str) -> SegmentSpec:
        return SegmentSpec(label=value, category=Code(value="91723000", scheme="SCT", meaning="Anatomical Structure"),
                           type=Code(value=value, scheme="SCT", meaning=value))

    left, right = segment_colours([spec("44029006"), spec("3341006")])
    assert left == SEGMENT_COLOURS[("SCT", "44029006")] and right == SEGMENT_COLOURS[("SCT", "3341006")]
    assert left != right
    unknown = [spec(str(n)) for n in range(100, 100 + len(FALLBACK_COLOURS))]
    colours = segment_colours(unknown)
    assert len(set(colours)) == len(colours)  # all distinct while the palette lasts
    assert segment_colours(unknown[:1]) == colours[:1]  # the same type, the same colour
    twice = segment_colours([spec("44029006"), spec("44029006")])
    assert twice[0] != twice[1]  # a repeated type in one SEG still gets a colour of its own
