"""Tests for node/results/sc.py: heatmap secondary captures for CT, X-ray and US, checked with dciodvfy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.imaging import load_image
from node.results.common import Provenance, series_number
from node.results.sc import DISCLAIMER, encode_sc
from node.results.seg import SEGMENT_COLOURS
from plugins.base import Findings, Heatmap, Image, Segmentation
from plugins.reference_threshold import MANIFEST
from plugins.reference_threshold.model import build, write_weights
from tests.dicom_checks import assert_valid

# the shared CT's PatientName has one component; highdicom warns about it (a source property, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

PROV = Provenance(
    manifest=MANIFEST, manufacturer="radnode test", model_name="radnode AI node", device_serial_number="T1"
)
SAME_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "AccessionNumber",
)


def _headers(paths: list[Path]) -> dict[str, Dataset]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def _save_valid(objects: list[Dataset], folder: Path) -> list[Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    reread = []
    for k, ds in enumerate(objects):
        path = folder / f"sc{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        reread.append(assert_valid(path))
    return reread


def _check_common(sc: Dataset, source: Dataset, shape: tuple[int, int]) -> None:
    for keyword in SAME_PATIENT_STUDY:
        assert (sc.get(keyword) or None) == (source.get(keyword) or None), keyword  # absent in source = empty
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == PROV.series_description("SC", source) and "AI-generated" in sc.SeriesDescription
    assert sc.SeriesNumber == series_number(MANIFEST.name, "SC", source)
    equipment = sc.ContributingEquipmentSequence[-1]  # the algorithm, after the source's acquisition equipment
    assert (equipment.ManufacturerModelName, equipment.DeviceUID) == (MANIFEST.name, PROV.device_uid)
    if sc.get("Laterality") not in ("R", "L") and not source.get("ImageLaterality"):
        # Type 2C: left out when the body part is known and unpaired; empty (unknown) only when nothing is known
        assert ("Laterality" not in sc) == bool(sc.get("BodyPartExamined"))
    assert sc.Manufacturer == "radnode test" and sc.DeviceSerialNumber == "T1"
    assert sc.SoftwareVersions == PROV.software_versions
    assert MANIFEST.name in sc.DerivationDescription
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    rows, columns = sc.pixel_array.shape[:2]
    assert columns == shape[1] and rows > shape[0] and sc.pixel_array.dtype == np.uint8
    band = sc.pixel_array[shape[0]:]  # the notice, model and colour bar sit in a band below the image
    assert (band.max(axis=2) > 200).any() and band.shape[0] >= 30
    (ref,) = sc.SourceImageSequence
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (source.SOPInstanceUID, source.SOPClassUID)


@pytest.fixture(scope="module")
def chest(ct_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, Findings, dict[str, Dataset]]:
    paths = sorted(ct_dir.glob("*.dcm"))
    image = load_image(paths)
    plugin = build(MANIFEST)
    plugin.load("cpu", write_weights(tmp_path_factory.mktemp("w") / "w.safetensors", 300.0))
    return image, plugin.run(image), _headers(paths)


def test_chest_ct_two_strongest_slices(chest, tmp_path: Path) -> None:
    image, findings, sources = chest
    image = dataclasses.replace(image, body_parts=frozenset({"CHEST"}))  # as the router's loader gives it
    series_uid = next(iter(sources.values())).SeriesInstanceUID
    objects = encode_sc(findings, image, sources, PROV, series_uid, max_images=2)
    assert len(objects) == 2
    heat = findings.heatmaps[0].values
    expected = sorted(np.argsort(heat.reshape(heat.shape[0], -1).sum(axis=1))[-2:].tolist())
    reread = _save_valid(objects, tmp_path)
    for k, (sc, z) in enumerate(zip(reread, expected, strict=True)):
        source = sources[image.sources[z].sop_instance_uid]
        _check_common(sc, source, image.pixels.shape[1:])
        assert sc.InstanceNumber == k + 1
        assert sc.SeriesInstanceUID == PROV.uid(series_uid, "SC", "series") != source.SeriesInstanceUID
        assert sc.SOPInstanceUID == PROV.uid(series_uid, "SC", f"above-threshold:{z}")
        assert list(sc.PatientOrientation) == ["L", "P"]
        assert (sc.BodyPartExamined, sc.ImageLaterality) == ("CHEST", "U") and "Laterality" not in sc  # unpaired
        assert [float(v) for v in sc.PixelSpacing] == pytest.approx([float(v) for v in source.PixelSpacing])
        pixels = sc.pixel_array[: image.pixels.shape[1]].astype(int)
        hot = heat[z] >= 0.5  # strongly coloured: red channel dominates, unlike grey
        assert hot.any() and (pixels[hot, 0] - pixels[hot, 2]).mean() > 60
        cold = heat[z] == 0  # no heat: stays grey; nothing is burned into the image itself
        assert np.all(pixels[cold, 0] == pixels[cold, 2])
    _render_png(reread[0], tmp_path / "ct_sc.png")


def _render_png(sc: Dataset, path: Path) -> None:
    """Write one SC as PNG to eyeball it (path printed with -s)."""
    from PIL import Image as PILImage

    PILImage.fromarray(sc.pixel_array).save(path)
    print(f"rendered SC: {path}")


def test_deterministic_uids(chest) -> None:
    image, findings, sources = chest
    first = encode_sc(findings, image, sources, PROV, "1.2.3", max_images=2)
    again = encode_sc(findings, image, sources, PROV, "1.2.3", max_images=2)
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert {d.SeriesInstanceUID for d in first} == {d.SeriesInstanceUID for d in again}
    assert np.array_equal(first[0].pixel_array, again[0].pixel_array)
    other = encode_sc(findings, image, sources, PROV, "1.2.4", max_images=2)
    assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in first}


def test_no_heatmaps_no_objects(chest) -> None:
    image, _, sources = chest
    assert encode_sc(Findings(), image, sources, PROV, "1.2.3") == []
    zero = Findings(heatmaps=[Heatmap("nothing", np.zeros(image.pixels.shape, np.float32))])
    assert encode_sc(zero, image, sources, PROV, "1.2.3") == []


def test_wrong_shape_and_bad_arguments(chest) -> None:
    image, findings, sources = chest
    wrong = Findings(heatmaps=[Heatmap("h", np.zeros(image.pixels.shape[1:], np.float32))])
    with pytest.raises(ValueError, match="shape"):
        encode_sc(wrong, image, sources, PROV, "1.2.3")
    with pytest.raises(ValueError, match="max_images"):
        encode_sc(findings, image, sources, PROV, "1.2.3", max_images=0)
    with pytest.raises(ValueError, match="not among the given sources"):
        encode_sc(findings, image, {}, PROV, "1.2.3")


def _gaussian(shape: tuple[int, ...], centre: tuple[float, ...], sigma: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def test_xray_single_image(data_root: Path, tmp_path: Path) -> None:
    paths = [data_root / "cxr_nih_google_dicom" / "nih_cxr_google_sc_dx.dcm"]
    image = load_image(paths)
    sources = _headers(paths)
    h, w = image.pixels.shape
    findings = Findings(heatmaps=[Heatmap("opacity", _gaussian((h, w), (h * 0.6, w * 0.3), h / 10))])
    (sc,) = _save_valid(encode_sc(findings, image, sources, PROV, "1.2.3"), tmp_path)
    _check_common(sc, sources[image.sources[0].sop_instance_uid], (h, w))
    assert sc.SOPInstanceUID == PROV.uid("1.2.3", "SC", "opacity:0")


def test_xray_keeps_source_orientation(data_root: Path, tmp_path: Path) -> None:
    """CR with PatientOrientation L\\F: the SC keeps it."""
    path = data_root / "cxr_nema_wg04_rg1" / "RG1_UNCR.dcm"
    source = pydicom.dcmread(path, stop_before_pixels=True)
    h, w = int(source.Rows), int(source.Columns)
    image = Image(
        kind="image2d",
        pixels=np.full((h, w), 0.5, np.float32),
        spacing=(1.0, 1.0),
        sources=load_image([path]).sources,
        modality="CR",
    )
    findings = Findings(heatmaps=[Heatmap("opacity", _gaussian((h, w), (h / 2, w / 2), h / 8))])
    (sc,) = encode_sc(findings, image, {str(source.SOPInstanceUID): source}, PROV, "1.2.3")
    assert list(sc.PatientOrientation) == ["L", "F"]


def test_ultrasound_strongest_frames(data_root: Path, tmp_path: Path) -> None:
    paths = [data_root / "us_samples_pydicom" / "examples_ybr_color.dcm"]
    image = load_image(paths)
    sources = _headers(paths)
    n, h, w = image.pixels.shape[:3]
    heat = np.zeros((n, h, w), np.float32)
    heat[7] = _gaussian((h, w), (h / 2, w / 2), h / 8)
    heat[21] = 0.5 * heat[7]
    heat[3, :2, :2] = 0.01  # weak: not among the two strongest
    findings = Findings(heatmaps=[Heatmap("lesion", heat)])
    objects = _save_valid(encode_sc(findings, image, sources, PROV, "1.2.3", max_images=2), tmp_path)
    assert len(objects) == 2
    for sc, frame in zip(objects, (7, 21), strict=True):
        _check_common(sc, sources[image.sources[frame].sop_instance_uid], (h, w))
        assert sc.SourceImageSequence[0].ReferencedFrameNumber == frame + 1
        assert sc.SOPInstanceUID == PROV.uid("1.2.3", "SC", f"lesion:{frame}")


def test_disclaimer_text() -> None:
    assert DISCLAIMER == "AI-generated - not for primary diagnosis"


def test_colour_bar_names_the_quantity_and_unit(chest) -> None:
    image, findings, sources = chest
    heat = dataclasses.replace(findings.heatmaps[0], quantity="local fraction below -950 HU", unit="%")
    (sc,) = encode_sc(dataclasses.replace(findings, heatmaps=[heat]), image, sources, PROV, "1.2.3", max_images=1)
    band = sc.pixel_array[image.pixels.shape[1]:].astype(int)
    colourful = np.abs(band[..., 0] - band[..., 2]) > 100  # the bar: blue at 0 (left), red at 1 (right)
    rows = np.flatnonzero(colourful.sum(axis=1) > band.shape[1] // 2)
    assert rows.size > 0
    bar = band[rows[rows.size // 2]]
    assert bar[10, 2] > bar[10, 0] and bar[-10, 0] > bar[-10, 2]
    assert "local fraction below -950 HU" in sc.DerivationDescription


def test_outlines_for_a_source_without_patient_geometry(data_root: Path, tmp_path: Path) -> None:
    """US has no frame of reference: besides the SEG, the mask outline is burned on its strongest frames."""
    paths = [data_root / "us_samples_pydicom" / "examples_ybr_color.dcm"]
    image = load_image(paths)
    sources = _headers(paths)
    assert "FrameOfReferenceUID" not in next(iter(sources.values()))
    n, h, w = image.pixels.shape[:3]
    mask = np.zeros((n, h, w), bool)
    mask[5, 60:120, 80:200] = True
    mask[6, 70:100, 90:150] = True
    manifest = MANIFEST.model_copy(update={"outputs": ["SEG", "SR", "SC"]})
    prov = dataclasses.replace(PROV, manifest=manifest)
    findings = Findings(segmentations=[Segmentation("above-threshold", mask)])
    objects = _save_valid(encode_sc(findings, image, sources, prov, "1.2.3", max_images=1), tmp_path)
    (sc,) = objects
    assert sc.SOPInstanceUID == prov.uid("1.2.3", "SC", "outline:5")  # the frame with the larger area
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 6
    pixels = sc.pixel_array[:h].astype(int)
    colour = np.array(SEGMENT_COLOURS[("SCT", "272673000")])
    edge = np.zeros((h, w), bool)
    edge[60, 80:200] = edge[119, 80:200] = edge[60:120, 80] = edge[60:120, 199] = True
    assert np.all(pixels[edge] == colour)  # the boundary in the segment's SEG colour
    assert not np.all(pixels[90, 140] == colour)  # the inside shows the image
    # with patient geometry (CT) the SEG overlays in viewers: no outline SC
    ct = Image(kind="volume", pixels=np.zeros((1, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0),
               sources=(image.sources[0],), modality="CT")
    with_frame = {uid: Dataset(ds) for uid, ds in sources.items()}
    for ds in with_frame.values():
        ds.FrameOfReferenceUID = "1.2.3.4"
    flat = Findings(segmentations=[Segmentation("above-threshold", np.ones((1, 8, 8), bool))])
    assert encode_sc(flat, ct, with_frame, prov, "1.2.3") == []
