"""Image loader: real CT/CR/DX/US/transfer-syntax data, synthetic series for each quality warning, lung check."""

from __future__ import annotations

import random
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import generate_uid

from node.imaging import ImageLoadError, load_image, quality_warnings
from node.route.lungs import check_lungs, check_lungs_in_files
from plugins.base import Image
from plugins.lungs import LUNG_MIN_ML
from tests.conftest import have, need
from tests.synthetic import write_ct_series

PHI_KEYWORDS = {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"}


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    """The robustness files make pydicom warn about their deliberate defects; that is not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def rewrite(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy a DICOM file with some attributes changed (None deletes one); a new SOP Instance UID."""
    ds = dcmread(src)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def assert_no_phi(image: Image) -> None:
    assert not PHI_KEYWORDS & set(image.attrs)
    text = repr(image.attrs) + repr(image.warnings)
    assert "Phantom^Synthetic" not in text and "PHANTOM" not in text


# --- the shared chest CT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest_paths(ct_dir: Path) -> list[Path]:
    paths = sorted(ct_dir.glob("*.dcm"))
    assert len(paths) == 64
    return paths


@pytest.fixture(scope="module")
def chest(chest_paths: list[Path]) -> Image:
    return load_image(chest_paths)


def test_chest_ct_is_sorted_along_the_normal(chest: Image, chest_paths: list[Path]) -> None:
    headers = [dcmread(p, stop_before_pixels=True) for p in chest_paths]
    position = {h.SOPInstanceUID: np.array([float(v) for v in h.ImagePositionPatient]) for h in headers}
    normal = np.array(chest.direction[2])
    assert np.allclose(normal, np.cross(chest.direction[0], chest.direction[1]))
    keys = np.array([position[s.sop_instance_uid] @ normal for s in chest.sources])
    assert np.all(np.diff(keys) > 0)
    assert np.allclose(np.diff(keys), 5.0)
    expected = sorted(headers, key=lambda h: position[h.SOPInstanceUID] @ normal)
    assert [s.sop_instance_uid for s in chest.sources] == [h.SOPInstanceUID for h in expected]
    assert {s.sop_class_uid for s in chest.sources} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert all(s.frame_number is None for s in chest.sources)
    assert chest.origin == pytest.approx(tuple(position[chest.sources[0].sop_instance_uid]))


def test_chest_ct_pixels_are_hu(chest: Image, chest_paths: list[Path]) -> None:
    assert chest.kind == "volume" and chest.modality == "CT"
    assert chest.pixels.shape == (64, 512, 512) and chest.pixels.dtype == np.float32
    assert chest.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    assert chest.pixels.min() >= -1100 and chest.pixels.max() < 4000
    # outside the body is air: about -1000 HU (-1024 where the scanner pads)
    assert -1030 <= float(np.median(chest.pixels[:, :40, :40])) <= -950
    # each slice is exactly the stored values through the rescale
    ds = dcmread(
        next(
            p
            for p in chest_paths
            if dcmread(p, stop_before_pixels=True).SOPInstanceUID == chest.sources[10].sop_instance_uid
        )
    )
    assert np.array_equal(chest.pixels[10], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert chest.warnings == ()
    assert chest.attrs["slice_count"] == 64 and chest.attrs["missing_slice_percent"] == 0.0
    assert chest.attrs["Modality"] == "CT" and chest.attrs["Manufacturer"] == "Philips"
    assert chest.attrs["SliceThickness"] == 5.0 and chest.attrs["ConvolutionKernel"] == "L"
    assert chest.attrs["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"]
    assert "BodyPartExamined" not in chest.attrs  # absent in this series: routing falls back to descriptions
    assert chest.attrs["StudyDescription"] == "Chest"
    assert not PHI_KEYWORDS & set(chest.attrs)
    assert chest.body_parts == frozenset()


def test_chest_ct_input_order_does_not_matter(chest: Image, chest_paths: list[Path]) -> None:
    shuffled = list(chest_paths)
    random.Random(7).shuffle(shuffled)
    again = load_image(shuffled)
    assert again.sources == chest.sources
    assert np.array_equal(again.pixels, chest.pixels)
    assert again.origin == chest.origin and again.spacing == chest.spacing


def test_chest_ct_has_lungs(chest: Image, chest_paths: list[Path]) -> None:
    full = check_lungs(chest)
    assert full.found and 2500 <= full.volume_ml <= 8000, full
    assert full.reason == f"air-filled lungs found ({full.volume_ml:.0f} ml)"
    for max_slices in (24, 8):
        cheap = check_lungs_in_files(chest_paths, max_slices=max_slices)
        assert cheap.found
        assert cheap.volume_ml == pytest.approx(full.volume_ml, rel=0.10), (max_slices, cheap, full)


# --- transfer syntaxes and decoding errors ---------------------------------------------------------------


def test_nine_transfer_syntaxes_decode_to_identical_pixels(data_root: Path) -> None:
    folder = data_root / "ts_conformance_dcm_qa_ts"
    reference = load_image([folder / "1.dcm"])
    syntaxes = {dcmread(folder / "1.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID}
    for number in range(2, 10):
        path = folder / f"{number}.dcm"
        syntaxes.add(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        image = load_image([path])
        # all nine encodings are lossless (explicit/implicit LE, BE, RLE, JPEG lossless, JPEG-LS, J2K lossless)
        assert np.array_equal(image.pixels, reference.pixels), path.name
    assert len(syntaxes) == 7  # the JPEG lossless and JPEG-LS encodings appear twice (two encoders)
    assert all(not uid.is_compressed or "Lossless" in uid.name for uid in syntaxes)
    assert reference.kind == "volume" and reference.modality == "MR" and reference.pixels.shape == (1, 384, 384)
    assert reference.warnings == ("too few slices: 1 (minimum 10)",)


def test_decoding_error_names_the_transfer_syntax(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"cannot decode the pixel data \(Explicit VR Little Endian\)"):
        load_image([data_root / "robustness_pydicom" / "MR_truncated.dcm"])
    # a JPEG Extended stream none of the installed decoders can read (NM re-labelled OT to reach the decoder)
    odd = rewrite(data_root / "robustness_pydicom" / "JPEG-lossy.dcm", tmp_path / "jpeg.dcm", Modality="OT")
    with pytest.raises(ImageLoadError, match=r"cannot decode the pixel data \(JPEG Extended \(Process 2 and 4\)\)"):
        load_image([odd])


BROKEN = {
    "ExplVR_LitEndNoMeta.dcm": "not a readable DICOM file",
    "ExplVR_BigEndNoMeta.dcm": "not a readable DICOM file",
    "OT-PAL-8-face.dcm": "not a readable DICOM file",
    "MR_truncated.dcm": "cannot decode the pixel data",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "no image instances",
    "rtplan_truncated.dcm": "no image instances",
    "UN_sequence.dcm": "no image instances",
    "nested_priv_SQ.dcm": "an image instance has no SOPClassUID, SOPInstanceUID, Rows, Columns",
    "JPEGLSNearLossless_16.dcm": "no Modality",
    "JPEG-LL.dcm": "modality NM is not supported",
    "emri_small.dcm": "multi-frame MR without per-frame geometry",
    "emri_small_RLE.dcm": "multi-frame MR without per-frame geometry",
}


@pytest.mark.parametrize("name, message", sorted(BROKEN.items()))
def test_broken_files_raise_image_load_error(data_root: Path, name: str, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message):
        load_image([data_root / "robustness_pydicom" / name])


def test_robustness_files_load_or_raise_image_load_error(data_root: Path) -> None:
    loaded = set()
    for path in sorted((data_root / "robustness_pydicom").rglob("*.dcm")):
        for call in (load_image, check_lungs_in_files):
            try:
                result = call([path])
            except ImageLoadError as exc:
                assert "Patient" not in str(exc)
                continue
            if isinstance(result, Image):
                loaded.add(path.name)
                assert_no_phi(result)
    assert {"693_UNCR.dcm", "bad_sequence.dcm", "eCT_Supplemental.dcm", "SC_rgb_small_odd.dcm"} <= loaded
    assert not set(BROKEN) & loaded


def test_enhanced_ct_frames_become_slices(data_root: Path) -> None:
    path = data_root / "robustness_pydicom" / "eCT_Supplemental.dcm"
    image = load_image([path], min_slices=1)
    assert image.kind == "volume" and image.pixels.shape == (2, 512, 512) and image.warnings == ()
    # IOP (-1,0,0, 0,1,0): the normal is -z, so frame 2 (z = -149) comes first
    assert image.direction is not None and image.direction[2] == pytest.approx((0.0, 0.0, -1.0))
    assert [s.frame_number for s in image.sources] == [2, 1]
    assert image.origin == pytest.approx((99.5, -301.5, -149.0))
    assert image.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    ds = dcmread(path)
    assert np.array_equal(image.pixels[0], ds.pixel_array[1].astype(np.float32) - 1024.0)


# --- X-ray ----------------------------------------------------------------------------------------------


def test_monochrome1_cr_is_inverted(data_root: Path) -> None:
    path = data_root / "cxr_nema_wg04_rg1" / "RG1_UNCR.dcm"
    image = load_image([path])
    ds = dcmread(path)
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    assert image.kind == "image2d" and image.modality == "CR"
    assert image.pixels.shape == (1955, 1841) and image.pixels.dtype == np.float32
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    # window 15000/30000 on 15-bit unsigned data maps to 0..32767; MONOCHROME1 reverses it
    assert np.allclose(image.pixels, 1.0 - voi / (2**15 - 1), atol=1e-6)
    assert np.corrcoef(image.pixels.ravel(), voi.ravel())[0, 1] < -0.999
    assert image.warnings == ("pixel spacing unknown",)  # PixelSpacing is 0\0 in this file
    assert image.spacing == (1.0, 1.0)


def test_monochrome2_dx_is_not_inverted(data_root: Path) -> None:
    path = data_root / "cxr_nih_google_dicom" / "nih_cxr_google_sc_dx.dcm"
    image = load_image([path])
    raw = dcmread(path).pixel_array.astype(np.float64)
    assert image.kind == "image2d" and image.modality == "DX" and image.pixels.shape == (1024, 1024)
    # no VOI in the file: the data range is the display range
    assert np.allclose(image.pixels, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert image.sources[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"


def test_jpeg2000_cxr_decodes(data_root: Path) -> None:
    folder = data_root / "cxr_nema_wg04_rg1"
    reference = load_image([folder / "RG1_UNCR.dcm"]).pixels
    assert np.array_equal(load_image([folder / "RG1_J2KR.dcm"]).pixels, reference)
    lossy = load_image([folder / "RG1_J2KI.dcm"]).pixels
    # RG1_J2KI is irreversible JPEG 2000 at 10:1 (LossyImageCompressionRatio 10, PSNR about 54 dB): on the
    # [0, 1] display scale it stays within 0.5 % on average and 2 % (5 grey levels of 256) everywhere
    difference = np.abs(lossy - reference)
    assert difference.mean() < 0.005 and difference.max() < 0.02


def test_several_images_in_a_2d_series_use_the_first(data_root: Path) -> None:
    folder = data_root / "cxr_nema_wg04_rg1"
    paths = [folder / "RG1_J2KI.dcm", folder / "RG1_J2KR.dcm", folder / "RG1_UNCR.dcm"]
    image = load_image(paths)
    assert image.sources[0].sop_instance_uid == dcmread(paths[2], stop_before_pixels=True).SOPInstanceUID
    assert "series has 3 images; used the first by InstanceNumber" in image.warnings


def test_rgb_secondary_capture_becomes_luminance(data_root: Path) -> None:
    path = data_root / "robustness_pydicom" / "SC_rgb_small_odd.dcm"
    image = load_image([path])
    rgb = dcmread(path).pixel_array.astype(np.float64)
    assert image.kind == "image2d" and image.pixels.shape == (3, 3)
    assert np.allclose(image.pixels, rgb @ [0.299, 0.587, 0.114] / 255.0, atol=1e-6)


# --- ultrasound ---------------------------------------------------------------------------------------


def test_us_multiframe_palette_becomes_rgb_frames(data_root: Path) -> None:
    path = data_root / "us_samples_pydicom" / "OBXXXX1A_rle_2frame.dcm"
    image = load_image([path])
    ds = dcmread(path, stop_before_pixels=True)
    assert image.kind == "frames" and image.modality == "US"
    assert image.pixels.shape == (2, 600, 800, 3) and image.pixels.dtype == np.uint8
    assert [s.frame_number for s in image.sources] == [1, 2]
    assert {s.sop_instance_uid for s in image.sources} == {ds.SOPInstanceUID}
    assert image.spacing == pytest.approx((0.2622878766196998, 0.2622878766196998))  # 0.0262 cm
    assert image.attrs["frame_count"] == 2 and image.warnings == ()


def test_us_ybr_cine_is_rgb(data_root: Path) -> None:
    path = data_root / "us_samples_pydicom" / "examples_ybr_color.dcm"
    image = load_image([path])
    assert image.pixels.shape == (30, 240, 320, 3) and image.pixels.dtype == np.uint8
    assert [s.frame_number for s in image.sources] == list(range(1, 31))
    ds = dcmread(path)
    ds.pixel_array_options(as_rgb=False)
    ybr = ds.pixel_array
    assert np.array_equal(image.pixels, convert_color_space(ybr, "YBR_FULL", "RGB"))
    assert not np.array_equal(image.pixels, ybr)


def test_us_single_frame_grey_and_a_series_of_single_frames(data_root: Path) -> None:
    folder = data_root / "us_samples_pydicom"
    grey = load_image([folder / "JPGLosslessP14SV1_1s_1f_8b.dcm"])
    assert grey.pixels.shape == (1, 768, 1024) and grey.pixels.dtype == np.uint8
    assert [s.frame_number for s in grey.sources] == [None]  # a single-frame instance: referenced whole
    series = load_image([folder / "US1_J2KI.dcm", folder / "US1_UNCR.dcm", folder / "US1_J2KR.dcm"])
    assert series.pixels.shape == (3, 480, 640, 3)
    assert [s.frame_number for s in series.sources] == [None, None, None]
    assert len({s.sop_instance_uid for s in series.sources}) == 3
    assert np.array_equal(series.pixels[0], series.pixels[1])  # UNCR (1) and lossless J2KR (2) agree
    assert series.warnings == ("pixel spacing unknown",)


def test_synthetic_series_is_valid_dicom(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, kind="head", slices=2, localizer=True, body_part="HEAD")
    paths += write_ct_series(tmp_path / "chest", slices=1)
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        for path in paths:
            ds = dcmread(path)
            assert ds.PatientName == "Phantom^Synthetic" and ds.PatientID == "PHANTOM"
            assert all(element.value is not None for element in ds.iterall())  # values validate on access
            assert ds.pixel_array.shape == (128, 128)
    finally:
        config.settings.reading_validation_mode = old
    need(have("dciodvfy"), "dciodvfy (dicom3tools) not installed")
    for path in paths:
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert "Error" not in out.stdout + out.stderr, out.stdout + out.stderr


# --- synthetic series: each quality warning --------------------------------------------------------------


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"missing": (10, 11, 12)}, ["missing slices: 3 of 40 expected positions (7.5%)"]),
        ({"jitter": 0.5}, ["inconsistent slice spacing: "]),
        (
            {"flip_orientation_at": (5,)},
            [
                "mixed orientations: kept 39 of 40 slices with the majority orientation",
                "missing slices: 1 of 40 expected positions (2.5%)",
            ],
        ),
        ({"tilt_mm": 1.0}, ["gantry tilt: slice positions sheared 21.8 degrees off the slice normal"]),
        ({"gantry_tilt": 15.0}, ["gantry tilt: GantryDetectorTilt 15.0 degrees"]),
        ({"slices": 5}, ["too few slices: 5 (minimum 10)"]),
        ({"duplicate_at": (3, 4)}, ["duplicate slice positions: dropped 2 slice(s)"]),
        ({"localizer": True}, ["dropped 1 localizer image(s)"]),
        ({}, []),
    ],
    ids=["missing", "spacing", "orientation", "shear", "gantry", "few", "duplicates", "localizer", "clean"],
)
def test_quality_warnings(tmp_path: Path, options: dict[str, Any], expected: list[str]) -> None:
    image = load_image(write_ct_series(tmp_path, **options))
    assert len(image.warnings) == len(expected), image.warnings
    for warning, start in zip(image.warnings, expected, strict=True):
        assert warning.startswith(start)
    assert image.pixels.shape[0] == image.attrs["slice_count"]
    assert_no_phi(image)


def test_missing_slices_are_reported_as_a_percentage(tmp_path: Path) -> None:
    image = load_image(write_ct_series(tmp_path, missing=(10, 11, 12)))
    assert image.attrs["missing_slice_percent"] == 7.5
    assert image.attrs["slice_count"] == 37 and image.spacing[0] == pytest.approx(2.5)


def test_inconsistent_spacing_is_not_a_gap(tmp_path: Path) -> None:
    image = load_image(write_ct_series(tmp_path, jitter=0.5))
    assert image.attrs["missing_slice_percent"] == 0.0
    warning = image.warnings[0]
    assert warning.startswith("inconsistent slice spacing: ") and "by more than 10% from the median" in warning


def test_single_slice_ct_is_a_one_slice_volume(tmp_path: Path) -> None:
    image = load_image(write_ct_series(tmp_path, slices=1, spacing=3.0))
    assert image.pixels.shape == (1, 128, 128)
    assert image.spacing[0] == 3.0  # SliceThickness stands in for the step
    assert image.warnings == ("too few slices: 1 (minimum 10)",)


def test_non_image_instances_are_skipped(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", slices=12)
    paths.append(rewrite(paths[0], tmp_path / "header-only.dcm", PixelData=None))
    image = load_image(paths)
    assert image.pixels.shape[0] == 12
    assert image.warnings == ("skipped 1 non-image instance(s) (no pixel data)",)


def test_quality_warnings_on_positions() -> None:
    positions = [(0.0, 0.0, z) for z in (0.0, 2.0, 4.0, 10.0, 12.0, 14.0)]
    quality = quality_warnings(positions, (0.0, 0.0, 1.0), min_slices=3)
    assert quality.step_mm == 2.0 and quality.missing == 2 and quality.expected == 8
    assert quality.warnings == ("missing slices: 2 of 8 expected positions (25.0%)",)
    # 1.5 x the step is still a step (inconsistent), not a gap
    quality = quality_warnings([(0, 0, 0), (0, 0, 2), (0, 0, 5), (0, 0, 7), (0, 0, 9)], (0, 0, 1), min_slices=1)
    assert quality.missing == 0 and quality.warnings[0].startswith("inconsistent slice spacing: 1 of 4 steps")
    with pytest.raises(ValueError):
        quality_warnings([], (0, 0, 1))


# --- lung check -----------------------------------------------------------------------------------------


def test_chest_phantom_has_lungs(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, kind="chest")
    full = check_lungs(load_image(paths))
    assert full.found and 2400 <= full.volume_ml <= 2900  # two ellipsoids cut to a 100 mm slab: 2.63 l
    assert check_lungs_in_files(paths, max_slices=10).volume_ml == pytest.approx(full.volume_ml, rel=0.05)


def test_head_labelled_chest_has_no_lungs(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, kind="head", study_description="CT CHEST", body_part="CHEST")
    result = check_lungs(load_image(paths))
    assert not result.found and 0 < result.volume_ml < 20  # the 4 ml sinus pocket
    assert result.reason == f"no air-filled lungs inside the body ({result.volume_ml:.0f} ml of internal air)"
    cheap = check_lungs_in_files(paths)
    assert not cheap.found and cheap.volume_ml < LUNG_MIN_ML


def test_lung_check_of_other_images(data_root: Path) -> None:
    mr = data_root / "ts_conformance_dcm_qa_ts" / "1.dcm"
    assert check_lungs(load_image([mr])).reason == "not a CT volume (MR volume)"
    assert not check_lungs_in_files([mr]).found
    with pytest.raises(ValueError):
        check_lungs_in_files([mr], max_slices=0)


# --- series-level errors ---------------------------------------------------------------------------------


def test_mixed_series_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "a", slices=3) + write_ct_series(tmp_path / "b", slices=3)
    with pytest.raises(ImageLoadError, match="2 different series"):
        load_image(paths)
    with pytest.raises(ImageLoadError, match="2 different series"):
        check_lungs_in_files(paths)


def test_mixed_modalities_are_refused(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, slices=3)
    paths.append(rewrite(paths[0], tmp_path / "pt.dcm", Modality="PT"))
    with pytest.raises(ImageLoadError, match="mixed modalities in one series: CT, PT"):
        load_image(paths)


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="no instances given"):
        load_image([])
    with pytest.raises(ImageLoadError, match=r"instance 1 of 1 is not a readable DICOM file \(No such file"):
        load_image([tmp_path / "1.2.3.dcm"])


def test_image_without_identity_is_refused(tmp_path: Path) -> None:
    ct = write_ct_series(tmp_path / "ct", slices=1)[0]
    with pytest.raises(ImageLoadError, match="an image instance has no SOPClassUID"):
        load_image([rewrite(ct, tmp_path / "no-class.dcm", SOPClassUID=None)])


def test_ct_without_geometry_is_refused(tmp_path: Path) -> None:
    paths = [
        rewrite(p, tmp_path / f"{i}.dcm", ImagePositionPatient=None)
        for i, p in enumerate(write_ct_series(tmp_path / "src", slices=2))
    ]
    with pytest.raises(ImageLoadError, match="no image has ImagePositionPatient and ImageOrientationPatient"):
        load_image(paths)
    bad = rewrite(paths[0], tmp_path / "bad.dcm", ImagePositionPatient=[0, 0, 0], ImageOrientationPatient=[1, 0, 0] * 2)
    with pytest.raises(ImageLoadError, match="not orthogonal"):
        load_image([bad])


def test_unsupported_kinds_are_refused(data_root: Path, tmp_path: Path) -> None:
    ct = write_ct_series(tmp_path / "ct", slices=1)[0]
    with pytest.raises(ImageLoadError, match="modality XA is not supported"):
        load_image([rewrite(ct, tmp_path / "xa.dcm", Modality="XA")])
    with pytest.raises(ImageLoadError, match="photometric interpretation YBR_PARTIAL_420 is not supported"):
        load_image([rewrite(ct, tmp_path / "sc.dcm", Modality="OT", PhotometricInterpretation="YBR_PARTIAL_420")])
    emri = data_root / "robustness_pydicom" / "emri_small.dcm"
    with pytest.raises(ImageLoadError, match="multi-frame MG images are not supported"):
        load_image([rewrite(emri, tmp_path / "mg.dcm", Modality="MG")])


def test_odd_slices_are_dropped_with_a_warning(tmp_path: Path) -> None:
    series_uid = generate_uid()
    paths = write_ct_series(tmp_path / "a", slices=12, series_uid=series_uid)
    paths += write_ct_series(tmp_path / "b", slices=2, size=64, series_uid=series_uid)  # another matrix size
    paths.append(rewrite(paths[0], tmp_path / "dose-screen.dcm", ImagePositionPatient=None))
    image = load_image(paths)
    assert image.pixels.shape == (12, 128, 128)
    assert image.warnings == (
        "dropped 1 image(s) without ImagePositionPatient/ImageOrientationPatient",
        "mixed image sizes: kept 12 of 14 slices with the majority size",
    )


def test_ct_without_pixel_spacing(tmp_path: Path) -> None:
    paths = [
        rewrite(p, tmp_path / f"{i}.dcm", PixelSpacing=None)
        for i, p in enumerate(write_ct_series(tmp_path / "src", slices=10))
    ]
    image = load_image(paths)
    assert image.spacing == (2.5, 1.0, 1.0) and image.warnings == ("pixel spacing unknown",)


@pytest.fixture
def small_ot(data_root: Path) -> Path:
    """A 32 x 32 8-bit MONOCHROME2 secondary capture without VOI."""
    return data_root / "robustness_pydicom" / "charset" / "chrX1.dcm"


def test_voi_lut_sequence_defines_the_display_range(small_ot: Path, tmp_path: Path) -> None:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "US", list(range(255, -1, -1)))  # an inverting LUT: 0 -> 255, 255 -> 0
    path = rewrite(small_ot, tmp_path / "voi.dcm", Modality="DX", VOILUTSequence=[item])
    raw = dcmread(small_ot).pixel_array.astype(np.float64)
    assert np.allclose(load_image([path]).pixels, (255.0 - raw) / 255.0, atol=1e-6)


def test_invalid_window_and_for_processing(small_ot: Path, tmp_path: Path) -> None:
    bad = rewrite(small_ot, tmp_path / "bad.dcm", Modality="DX", WindowCenter="100", WindowWidth="0")
    with pytest.raises(ImageLoadError, match="cannot apply the VOI LUT or window"):
        load_image([bad])
    raw = rewrite(small_ot, tmp_path / "raw.dcm", Modality="DX", PresentationIntentType="FOR PROCESSING")
    assert "image is FOR PROCESSING (raw detector data, not for presentation)" in load_image([raw]).warnings


def test_us_frames_of_another_size_are_skipped(data_root: Path, tmp_path: Path) -> None:
    folder = data_root / "us_samples_pydicom"
    first = folder / "JPGLosslessP14SV1_1s_1f_8b.dcm"
    series_uid = dcmread(first, stop_before_pixels=True).SeriesInstanceUID
    other = rewrite(folder / "US1_UNCR.dcm", tmp_path / "rgb.dcm", SeriesInstanceUID=series_uid, InstanceNumber=99)
    image = load_image([other, first])
    assert image.pixels.shape == (1, 768, 1024)
    assert image.warnings == ("skipped 1 instance(s) whose frames differ in size or colour from the first",)
