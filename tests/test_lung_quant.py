"""lung-quant plugin and the chest phantom: lungs and indices on the shared chest CT and on the phantom
(against its truth), not-applicable series, quality warnings, and valid SR/SEG/SC outputs."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from node.demo import phantom
from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from plugins.base import Findings, Image, SourceRef
from plugins.lung_quant import (
    BOTH_LUNGS,
    LAA_950,
    LEFT_LUNG,
    LOW_ATTENUATION,
    MANIFEST,
    MEAN_LUNG_DENSITY,
    PERC_15,
    RIGHT_LUNG,
    VOLUME,
)
from plugins.lung_quant.model import sharp_kernel
from plugins.registry import build
from tests.conftest import REPO
from tests.dicom_checks import assert_valid
from tests.synthetic import write_ct_series

CONCEPTS = {"volume": VOLUME, "mld": MEAN_LUNG_DENSITY, "laa": LAA_950, "perc15": PERC_15}


@dataclass
class Case:
    paths: list[Path]
    image: Image
    findings: Findings
    seconds: float

    def value(self, what: str, segment: str | None) -> float:
        concept = CONCEPTS[what]
        (value,) = [m.value for m in self.findings.measurements if m.concept == concept and m.segment == segment]
        return value

    def mask(self, segment: str) -> np.ndarray:
        (mask,) = [s.mask for s in self.findings.segmentations if s.segment == segment]
        return mask


def run(paths: list[Path]) -> Case:
    image = load_image(sorted(paths))
    plugin = build(MANIFEST)
    plugin.load("cpu", None)
    t = time.perf_counter()
    findings = plugin.run(image)
    seconds = time.perf_counter() - t
    print(f"lung-quant on {image.pixels.shape}: {seconds:.2f} s; {findings.summary}")
    return Case(sorted(paths), image, findings, seconds)


@pytest.fixture(scope="module")
def chest(ct_dir: Path) -> Case:
    return run(list(ct_dir.glob("*.dcm")))


@pytest.fixture(scope="module")
def ph(tmp_path_factory) -> tuple[phantom.Phantom, Case]:
    folder = tmp_path_factory.mktemp("phantom")
    t = time.perf_counter()
    truth = phantom.write_chest_phantom(folder, seed=1)
    print(f"phantom written in {time.perf_counter() - t:.2f} s ({len(truth.paths)} slices)")
    return truth, run(truth.paths)


def write(case: Case, out: Path) -> list[Path]:
    paths_by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in case.paths}
    series_uid = str(pydicom.dcmread(case.paths[0], stop_before_pixels=True).SeriesInstanceUID)
    sources = read_sources(case.image, paths_by_uid)
    return write_outputs(case.findings, case.image, sources, Provenance(MANIFEST), series_uid, out, meta={})


# --- the manifest -----------------------------------------------------------------------------------


def test_manifest_codes_and_light_import():
    assert MANIFEST.name == "lung-quant" and MANIFEST.weights is None and not MANIFEST.reference_only
    codes = {s.label: (s.category.value, s.type.value) for s in MANIFEST.segments}
    assert codes == {
        LEFT_LUNG: ("91723000", "44029006"),
        RIGHT_LUNG: ("91723000", "3341006"),
        BOTH_LUNGS: ("91723000", "39607008"),  # where the totals are measured
        LOW_ATTENUATION: ("49755003", "87433001"),
    }
    assert MANIFEST.series.body_parts == ["CHEST"]
    code = "import sys, plugins.lung_quant; assert 'scipy' not in sys.modules, 'manifest imports scipy'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_sharp_kernels():
    for kernel, manufacturer in [("B60f", "SIEMENS"), ("B70f", None), ("Br64d", "Siemens"), (["Bl57d", "3"], None),
                                 ("LUNG", "GE MEDICAL SYSTEMS"), ("BONEPLUS", None), ("L", "Philips"),
                                 ("YB", None), ("FC52", "TOSHIBA"), ("FC86", None), ("SHARP", "UIH")]:
        assert sharp_kernel(kernel, manufacturer), kernel
    for kernel, manufacturer in [("B31f", "SIEMENS"), ("Br40d", None), (["I30f", "3"], None), ("STANDARD", "GE"),
                                 ("SOFT", None), ("B", "Philips"), ("L", None), ("FC12", "TOSHIBA"), ("", None),
                                 (None, None)]:
        assert not sharp_kernel(kernel, manufacturer), kernel


# --- the shared chest CT ----------------------------------------------------------------------------


def test_chest_ct_volumes(chest: Case):
    assert chest.findings.not_applicable is None
    chest.findings.validate(MANIFEST, chest.image)
    right, left, total = (chest.value("volume", s) for s in (RIGHT_LUNG, LEFT_LUNG, BOTH_LUNGS))
    print(f"right {right} mL, left {left} mL, total {total} mL, run {chest.seconds:.2f} s")
    for segment in (RIGHT_LUNG, LEFT_LUNG, BOTH_LUNGS):
        print(segment, {k: chest.value(k, segment) for k in CONCEPTS})
    assert 1000 <= left <= 4000 and 1000 <= right <= 4000
    assert 2500 <= total <= 8000
    assert right > left
    assert total == pytest.approx(right + left, abs=0.2)
    voxel_ml = float(np.prod(chest.image.spacing)) / 1000.0
    assert right == pytest.approx(np.count_nonzero(chest.mask(RIGHT_LUNG)) * voxel_ml, abs=0.1)
    assert not (chest.mask(RIGHT_LUNG) & chest.mask(LEFT_LUNG)).any()
    for segment in (RIGHT_LUNG, LEFT_LUNG, BOTH_LUNGS):
        assert -950 < chest.value("mld", segment) < -700
        assert 0 <= chest.value("laa", segment) <= 100
        assert chest.value("perc15", segment) < chest.value("mld", segment)


def test_chest_ct_left_right_follow_patient_coordinates(chest: Case):
    # ImageOrientationPatient rows run along +x (the patient's left): the left lung lies at higher columns
    assert chest.image.direction[0][0] > 0.9
    cols = [np.nonzero(chest.mask(s))[2].mean() for s in (RIGHT_LUNG, LEFT_LUNG)]
    assert cols[0] < cols[1]


def _body(hu: np.ndarray) -> np.ndarray:
    """Per slice: the largest region above -500 HU, holes filled (as the router's lung check)."""
    body = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):
        lab, n = ndimage.label(hu[z] > -500)
        if n:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            body[z] = ndimage.binary_fill_holes(lab == np.argmax(sizes))
    return body


def test_chest_ct_lungs_inside_the_body(chest: Case):
    lungs = chest.mask(RIGHT_LUNG) | chest.mask(LEFT_LUNG)
    assert not (lungs & ~_body(chest.image.pixels)).any()


def _trachea(hu: np.ndarray, top: int, pixel_mm2: float) -> tuple[np.ndarray, int]:
    """The trachea down to the carina, found independently of the plugin: the airway grown below -950 HU
    from the trachea (in the top-most slice that has one, the air region of 100-1200 pixels nearest the
    body's centre, from its darkest voxel); the carina = the highest slice where that airway holds two
    regions of main-bronchus size (60 mm2 each, a lumen of 9 mm); the trachea = the part of the airway
    above the carina connected to the seed there (upper-lobe bronchi rising above the carina level are
    lung, not trachea). Returns the trachea mask and the carina slice."""
    body = _body(hu)
    step = -1 if top else 1
    for z in range(top, top + step * 10, step):
        lab, n = ndimage.label((hu[z] < -950) & body[z])
        sizes = np.bincount(lab.ravel())
        candidates = [c for c in range(1, n + 1) if 100 <= sizes[c] <= 1200]
        if candidates:
            centre = np.array(ndimage.center_of_mass(body[z]))
            trachea = min(candidates, key=lambda c: np.linalg.norm(np.array(ndimage.center_of_mass(lab == c)) - centre))
            seed = (z, *np.unravel_index(np.argmin(np.where(lab == trachea, hu[z], np.inf)), lab.shape))
            break
    else:
        raise AssertionError("no trachea in the top slices")
    grown, _ = ndimage.label((hu < -950) & body)
    airway = grown == grown[seed]
    for carina in range(top, top + step * len(hu), step):
        parts, count = ndimage.label(airway[carina])
        if count >= 2 and np.sort(np.bincount(parts.ravel())[1:])[-2] * pixel_mm2 >= 60.0:
            break
    else:
        raise AssertionError("no carina found")
    above = np.zeros_like(airway)
    rows = slice(carina - step, top + 1) if top else slice(0, carina)  # the slices above the carina
    above[rows] = airway[rows]
    lab, _ = ndimage.label(above)
    return lab == lab[seed], carina


def test_chest_ct_lungs_free_of_trachea(chest: Case):
    hu = chest.image.pixels
    top = hu.shape[0] - 1 if chest.image.direction[2][2] > 0 else 0
    trachea, carina = _trachea(hu, top, chest.image.spacing[1] * chest.image.spacing[2])
    trachea_ml = np.count_nonzero(trachea) * float(np.prod(chest.image.spacing)) / 1000.0
    print(f"carina at slice {carina}; trachea above it {trachea_ml:.1f} mL")
    assert 5 < trachea_ml < 100  # a trachea, not a leak into the lungs
    lungs = chest.mask(RIGHT_LUNG) | chest.mask(LEFT_LUNG)
    assert not (lungs & trachea).any()


def test_chest_ct_is_repeatable(chest: Case):
    again = run(chest.paths)
    for m in chest.findings.measurements:
        (other,) = [o for o in again.findings.measurements if (o.concept, o.segment) == (m.concept, m.segment)]
        assert other.value == pytest.approx(m.value, rel=0.01, abs=0.01)


def test_chest_ct_quality_warnings(chest: Case):
    warnings = chest.findings.warnings
    assert any(w.startswith("slice thickness 5.0 mm > 1.5 mm") for w in warnings), warnings
    assert any("sharp reconstruction kernel L" in w for w in warnings), warnings  # Philips "L" (lung)
    assert not any("cut off" in w for w in warnings), warnings
    assert not set(warnings) & set(chest.image.warnings)


def test_chest_ct_heatmap_and_low_attenuation(chest: Case):
    (heat,) = chest.findings.heatmaps
    lungs = chest.mask(RIGHT_LUNG) | chest.mask(LEFT_LUNG)
    assert heat.values.shape == chest.image.pixels.shape
    assert heat.values.min() >= 0 and heat.values.max() <= 1 and not heat.values[~lungs].any()
    laa = chest.mask(LOW_ATTENUATION)
    assert not (laa & ~lungs).any() and (chest.image.pixels[laa] < -950).all()
    assert np.count_nonzero(laa) / np.count_nonzero(lungs) * 100 == pytest.approx(chest.value("laa", BOTH_LUNGS), abs=0.01)


def test_chest_ct_outputs_are_valid_dicom(chest: Case, tmp_path: Path):
    written = write(chest, tmp_path)
    names = sorted(p.name for p in written)
    assert "SEG.dcm" in names and "SR.dcm" in names and any(n.startswith("SC-") for n in names)
    for path in written:
        if path.suffix == ".dcm":
            assert_valid(path)
    seg = pydicom.dcmread(tmp_path / "SEG.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [RIGHT_LUNG, LEFT_LUNG, BOTH_LUNGS, LOW_ATTENUATION]
    sr = pydicom.dcmread(tmp_path / "SR.dcm")
    text = str(sr)
    for concept in CONCEPTS.values():
        assert concept.value in text
    report = hd.sr.srread(tmp_path / "SR.dcm").content
    # the totals are a group named for what they measure, with its finding and its segment (not "whole image")
    assert report.get_image_measurement_groups() == []
    volumetric = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    assert set(volumetric) == {RIGHT_LUNG, LEFT_LUNG, BOTH_LUNGS, LOW_ATTENUATION}
    assert volumetric[BOTH_LUNGS].finding_type.value == "39607008"
    assert volumetric[BOTH_LUNGS].referenced_segment.referenced_segment_numbers == [3]
    # and each segment on its key slice, outlined, under the same tracking UID: OHIF shows the values there
    planar = {g.tracking_identifier: g for g in report.get_planar_roi_measurement_groups()}
    assert set(planar) == {RIGHT_LUNG, LEFT_LUNG, BOTH_LUNGS, LOW_ATTENUATION}
    assert all(planar[k].tracking_uid == volumetric[k].tracking_uid for k in planar)
    volume = {g: [m.value for m in volumetric[g].get_measurements() if m.name.value == CONCEPTS["volume"].value]
              for g in (RIGHT_LUNG, LEFT_LUNG)}
    assert volume == {RIGHT_LUNG: [chest.value("volume", RIGHT_LUNG)], LEFT_LUNG: [chest.value("volume", LEFT_LUNG)]}
    both = planar[BOTH_LUNGS].roi.value  # the hull around both lungs on the key slice spans the chest
    assert np.ptp(both[:, 0]) > 0.5 * chest.image.pixels.shape[2]


# --- the phantom ----------------------------------------------------------------------------------


def _labels_as_loaded(truth: phantom.Phantom, image: Image) -> np.ndarray:
    """The phantom's labels in the loaded image's slice order (the loader sorts along the slice normal)."""
    if np.array_equal(image.pixels, truth.hu):
        return truth.labels
    assert np.array_equal(image.pixels, truth.hu[::-1])
    return truth.labels[::-1]


def _check_against_truth(truth: phantom.Phantom, case: Case) -> None:
    case.findings.validate(MANIFEST, case.image)
    for segment, lung in ((RIGHT_LUNG, truth.right), (LEFT_LUNG, truth.left), (BOTH_LUNGS, truth.total)):
        volume, laa = case.value("volume", segment), case.value("laa", segment)
        print(f"{segment or 'total'}: volume {volume} vs {lung.volume_ml:.1f} mL "
              f"({100 * (volume / lung.volume_ml - 1):+.2f}%), LAA-950 {laa} vs {lung.laa950_percent:.2f}%, "
              f"MLD {case.value('mld', segment)} vs {lung.mean_hu:.1f}, "
              f"Perc15 {case.value('perc15', segment)} vs {lung.perc15_hu:.1f}")
        assert volume == pytest.approx(lung.volume_ml, rel=0.03)
        assert laa == pytest.approx(lung.laa950_percent, abs=1.0)
        assert case.value("mld", segment) == pytest.approx(lung.mean_hu, abs=10)
        assert case.value("perc15", segment) == pytest.approx(lung.perc15_hu, abs=10)
    labels = _labels_as_loaded(truth, case.image)
    for segment, code in ((RIGHT_LUNG, phantom.RIGHT_LUNG), (LEFT_LUNG, phantom.LEFT_LUNG)):
        mask, true = case.mask(segment), labels == code
        dice = 2.0 * np.count_nonzero(mask & true) / (np.count_nonzero(mask) + np.count_nonzero(true))
        assert dice > 0.97, (segment, dice)
    lungs = case.mask(RIGHT_LUNG) | case.mask(LEFT_LUNG)
    assert not (lungs & (labels == phantom.AIRWAY)).any()  # trachea and main bronchi
    assert not (lungs & (labels == phantom.GAS)).any()  # stomach gas below the left lung
    assert not (lungs & (labels == phantom.TABLE)).any()


def test_phantom_matches_its_truth(ph):
    truth, case = ph
    assert truth.right.volume_ml > truth.left.volume_ml
    assert 5 < truth.right.laa950_percent < 20 and truth.left.laa950_percent < truth.right.laa950_percent
    assert truth.right.laa950_percent == pytest.approx(truth.right.emphysema_percent, abs=0.5)
    _check_against_truth(truth, case)


def test_mirrored_phantom_keeps_left_and_right(tmp_path: Path):
    # columns run to the patient's right and the slice normal to the feet: the loader and the plugin must
    # follow ImageOrientationPatient rather than the array order
    truth = phantom.write_chest_phantom(tmp_path, seed=2, mirrored=True, spacing=5.0, size=192)
    case = run(truth.paths)
    assert case.image.direction[0][0] < -0.9
    _check_against_truth(truth, case)


def test_phantom_without_emphysema_has_no_low_attenuation_segment(tmp_path: Path):
    truth = phantom.write_chest_phantom(tmp_path / "ct", seed=3, emphysema_percent=(0.0, 0.0), size=128)
    case = run(truth.paths)
    assert truth.total.laa950_percent < 0.01
    assert LOW_ATTENUATION not in {s.segment for s in case.findings.segmentations}
    assert case.value("laa", BOTH_LUNGS) < 0.01
    for path in write(case, tmp_path / "out"):
        if path.suffix == ".dcm":
            assert_valid(path)


def test_lungs_cut_off_are_reported(tmp_path: Path):
    truth = phantom.write_chest_phantom(tmp_path, slices=40, size=128)
    warnings = run(truth.paths).findings.warnings
    assert any(w.startswith("lungs cut off at the top") for w in warnings), warnings
    assert any(w.startswith("lungs cut off at the bottom") for w in warnings), warnings


def test_phantom_rejects_bad_arguments(tmp_path: Path):
    for kwargs, message in [({"spacing": 0}, "spacing"), ({"size": 32}, "size"), ({"slices": 0}, "slices")]:
        with pytest.raises(ValueError, match=message):
            phantom.write_chest_phantom(tmp_path, **kwargs)


def _volume(hu: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> Image:
    return Image(kind="volume", pixels=hu.astype(np.float32), spacing=spacing, modality="CT", origin=origin,
                 direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                 sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(len(hu))))


def test_fused_lungs_are_split_at_the_midline():
    # two lungs merged over a wide front (no junction line to erode) and no trachea: cut along the midline
    spacing, origin = (5.0, 2.5, 2.5), (-158.75, -158.75, -97.5)
    plane = np.arange(128) * 2.5 - 158.75
    z, y, x = np.meshgrid(np.arange(40) * 5.0 - 97.5, plane, plane, indexing="ij")
    hu = np.where((x / 150) ** 2 + (y / 110) ** 2 <= 1, 40.0, -1000.0)
    right = ((x + 50) / 55) ** 2 + ((y + 10) / 80) ** 2 + (z / 90) ** 2 <= 1
    left = ((x - 50) / 55) ** 2 + ((y + 10) / 80) ** 2 + (z / 90) ** 2 <= 1
    hu[right | left] = -850.0
    hu += np.random.default_rng(0).normal(0.0, 10.0, hu.shape)
    findings = build(MANIFEST).run(_volume(hu, spacing, origin))
    masks = {s.segment: s.mask for s in findings.segmentations}
    assert not (masks[RIGHT_LUNG] & left & ~right).any() and not (masks[LEFT_LUNG] & right & ~left).any()
    volumes = {m.segment: m.value for m in findings.measurements if m.concept == VOLUME}
    assert volumes[RIGHT_LUNG] == pytest.approx(volumes[LEFT_LUNG], rel=0.02)
    assert volumes[BOTH_LUNGS] == pytest.approx(np.count_nonzero(right | left) * 5 * 2.5 * 2.5 / 1000, rel=0.01)
    assert "trachea not found: the airways could not be separated from the lungs" in findings.warnings


# --- not applicable -------------------------------------------------------------------------------


def test_head_ct_is_not_applicable(tmp_path: Path):
    case = run(write_ct_series(tmp_path, kind="head", slices=20, size=128))
    assert case.findings.not_applicable and "no air-filled lungs" in case.findings.not_applicable
    assert not case.findings.segmentations and not case.findings.measurements


def test_single_slice_is_not_applicable(tmp_path: Path):
    case = run(write_ct_series(tmp_path, kind="chest", slices=1, size=128))
    assert case.findings.not_applicable and "slices" in case.findings.not_applicable


def test_other_images_are_not_applicable():
    plugin = build(MANIFEST)
    xray = Image(kind="image2d", pixels=np.zeros((64, 64), np.float32), spacing=(1.0, 1.0), modality="DX",
                 sources=(SourceRef("1.2.3", "1.2.840.10008.5.1.4.1.1.1.1"),))
    assert "volume" in plugin.run(xray).not_applicable
    mr = Image(kind="volume", pixels=np.zeros((20, 64, 64), np.float32), spacing=(5.0, 1.0, 1.0), modality="MR",
               sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.4") for i in range(20)))
    assert "CT" in plugin.run(mr).not_applicable
    sagittal = Image(kind="volume", pixels=np.full((20, 64, 64), -1000, np.float32), spacing=(2.0, 1.0, 1.0),
                     modality="CT", direction=((0, 1, 0), (0, 0, -1), (-1, 0, 0)),
                     sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(20)))
    assert "axial" in plugin.run(sagittal).not_applicable


# --- comparison with a prior study ---------------------------------------------------------------------------


def test_change_since_a_prior_study_is_measured_and_encoded(ph, tmp_path: Path):
    """The prior is the same chest without emphysema (every voxel below -950 HU raised to -900): the lungs
    keep their volume and LAA-950 rises by the current LAA-950 since then. SR and findings carry both."""
    from dataclasses import replace

    from plugins.base import Prior
    from plugins.lung_quant import LAA_950_CHANGE, VOLUME_CHANGE

    _, case = ph
    prior_pixels = np.where(case.image.pixels < -950, -900.0, case.image.pixels).astype(np.float32)
    prior = Prior("1.2.826.0.1.3680043.8.498.1", "2025-06-01", 200, replace(case.image, pixels=prior_pixels))
    plugin = build(MANIFEST)
    findings = plugin.run(replace(case.image, priors=(prior,)))
    change = {m.concept: m for m in findings.measurements if m.concept in (VOLUME_CHANGE, LAA_950_CHANGE)}
    assert change[VOLUME_CHANGE].unit == "mL" and abs(change[VOLUME_CHANGE].value) < 0.02 * case.value(
        "volume", BOTH_LUNGS)  # the same lungs, segmented again with different air inside
    assert change[LAA_950_CHANGE].value == pytest.approx(case.value("laa", BOTH_LUNGS), abs=0.05)
    assert change[LAA_950_CHANGE].value > 1
    assert "since the prior of 2025-06-01" in findings.summary
    assert MANIFEST.priors is not None and MANIFEST.priors.max_studies == 1
    out = write(Case(case.paths, replace(case.image, priors=(prior,)), findings, 0.0), tmp_path / "out")
    sr_path = next(p for p in out if p.name == "SR.dcm")
    assert_valid(sr_path)
    codes = {str(item.ConceptNameCodeSequence[0].CodeValue) for item in _walk(pydicom.dcmread(sr_path))}
    assert {"LUNGVOLCHG", "LAA950CHG"} <= codes
    # without a prior nothing is compared and nothing is invented
    assert not any(m.concept in (VOLUME_CHANGE, LAA_950_CHANGE) for m in case.findings.measurements)


def test_a_prior_without_lungs_is_a_warning_not_a_number(ph):
    from dataclasses import replace

    from plugins.base import Prior
    from plugins.lung_quant import LAA_950_CHANGE, VOLUME_CHANGE

    _, case = ph
    water = replace(case.image, pixels=np.zeros_like(case.image.pixels))
    findings = build(MANIFEST).run(replace(case.image, priors=(Prior("1.2.3", "2025-01-01", 300, water),)))
    assert not any(m.concept in (VOLUME_CHANGE, LAA_950_CHANGE) for m in findings.measurements)
    assert any(w.startswith("prior study of 2025-01-01 not compared") for w in findings.warnings)


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        if "ConceptNameCodeSequence" in item:
            yield item
        yield from _walk(item)
