"""ct-chest-triage plugin: manifest and codes, configuration and weights (never made up), preprocessing (size,
HU window, orientation), the shared chest CT end to end to valid SR and SC, Grad-CAM against autograd, missing
slices, series that do not apply, and the ONNX export and backend. A tiny architecture with seeded weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from node.results.sr import COMMENT
from plugins.base import Findings, Image, SourceRef, WeightsUnavailable
from plugins.ct_chest_triage import FINDING_KEYS, FINDINGS, MANIFEST, MISSING_SLICES, PATHOLOGY, PATHOLOGY_KEY
from plugins.ct_chest_triage.model import (
    ChestTriage,
    Prepared,
    build_network,
    heatmap_on_image,
    missing_slices_percent,
    parse_config,
    prepare,
    window,
)
from plugins.registry import build
from plugins.torch_common import save_weights
from tests.conftest import REPO
from tests.dicom_checks import assert_valid
from tests.synthetic import write_ct_series

TINY = {"widths": [4, 8, 8, 16], "input_size": [32, 64, 64]}
CONCEPTS = [PATHOLOGY, *FINDINGS.values()]


def models_folder(folder: Path, **config: object) -> Path:
    """<folder>/model.safetensors of the tiny architecture (seeded) and a config.json selecting it; returns
    the weights path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY, **config}))
    torch.manual_seed(0)
    net = build_network(parse_config({**MANIFEST.config, **TINY}))
    with torch.no_grad():  # a visible spread of probabilities instead of all near 0.5
        net.findings_head.bias.copy_(torch.linspace(-3.0, 3.0, len(FINDING_KEYS)))
    return save_weights(net, folder / "model.safetensors")


def loaded(weights: Path) -> ChestTriage:
    plugin = build(MANIFEST)
    assert isinstance(plugin, ChestTriage)
    plugin.load("cpu", weights)
    return plugin


@dataclass
class Case:
    paths: list[Path]
    image: Image
    findings: Findings


def run(plugin: ChestTriage, paths: list[Path]) -> Case:
    image = load_image(sorted(paths))
    return Case(sorted(paths), image, plugin.run(image))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return models_folder(tmp_path_factory.mktemp("models") / MANIFEST.name)


@pytest.fixture(scope="module")
def plugin(weights: Path) -> ChestTriage:
    return loaded(weights)


@pytest.fixture(scope="module")
def chest(ct_dir: Path, plugin: ChestTriage) -> Case:
    return run(plugin, list(ct_dir.glob("*.dcm")))


def write(case: Case, out: Path) -> list[Path]:
    paths_by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in case.paths}
    series_uid = str(pydicom.dcmread(case.paths[0], stop_before_pixels=True).SeriesInstanceUID)
    sources = read_sources(case.image, paths_by_uid)
    return write_outputs(case.findings, case.image, sources, Provenance(MANIFEST), series_uid, out, meta={})


# --- manifest, configuration, weights ----------------------------------------------------------------


def test_manifest_codes_and_light_import():
    assert MANIFEST.name == "ct-chest-triage" and MANIFEST.version == "1.0.0" and MANIFEST.queue == "gpu"
    assert MANIFEST.modalities == ["CT"] and MANIFEST.outputs == ["SR", "SC"]
    assert MANIFEST.series.body_parts == ["CHEST"] and MANIFEST.series.min_slices == 20
    assert MANIFEST.weights == "model.safetensors"
    assert len(FINDING_KEYS) == 20 and MANIFEST.findings == [*CONCEPTS, MISSING_SLICES]
    assert len({(c.scheme, c.value) for c in MANIFEST.findings}) == len(MANIFEST.findings)
    assert all(c.value.isdigit() for c in MANIFEST.findings if c.scheme in ("SCT", "DCM"))
    codes = {key: (c.scheme, c.value) for key, c in FINDINGS.items()}
    assert codes["emphysema"] == ("SCT", "87433001") and codes["cardiomegaly"] == ("SCT", "8186001")
    assert codes["coronary_artery_wall_calcification"] == ("SCT", "445512009")
    assert (PATHOLOGY.scheme, PATHOLOGY.value) == ("SCT", "408574004")
    config = parse_config(MANIFEST.config)
    assert config.encoder == "resnet18" and config.input_size == (128, 256, 256) and config.backend == "auto"
    assert config.hu_window == (-1000.0, 400.0) and set(config.thresholds) == {PATHOLOGY_KEY, *FINDING_KEYS}
    code = ("import sys, plugins.ct_chest_triage; heavy = {'torch', 'monai', 'scipy'} & set(sys.modules); "
            "assert not heavy, f'manifest imports {heavy}'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("change, message", [
    ({"encoder": "resnet50"}, "encoder"),
    ({"widths": [4, 8, 8]}, "widths"),
    ({"input_size": [4, 64, 64]}, "input_size"),
    ({"hu_window": [400, -1000]}, "low < high"),
    ({"thresholds": {**MANIFEST.config["thresholds"], "fracture": 0.5}}, "unknown finding"),
    ({"thresholds": {PATHOLOGY_KEY: 0.5}}, "no threshold for medical_material"),
    ({"thresholds": {**MANIFEST.config["thresholds"], "mass": 1.5}}, "thresholds.mass"),
    ({"backend": "tensorrt"}, "backend"),
])
def test_bad_configuration_is_refused(change: dict, message: str):
    with pytest.raises(WeightsUnavailable, match=message):
        parse_config({**MANIFEST.config, **change})


def test_missing_or_mismatched_weights_make_the_plugin_unavailable(weights: Path, tmp_path: Path):
    plugin = build(MANIFEST)
    with pytest.raises(WeightsUnavailable, match="not found"):
        plugin.load("cpu", tmp_path / "absent" / "model.safetensors")
    with pytest.raises(WeightsUnavailable, match="not found"):
        plugin.load("cpu", None)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(weights, other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**TINY, "widths": [8, 8, 8, 16]}))
    with pytest.raises(WeightsUnavailable, match="does not fit the configured architecture"):
        plugin.load("cpu", other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**TINY, "depth": 3}))
    with pytest.raises(WeightsUnavailable, match="unknown key"):
        plugin.load("cpu", other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    with pytest.raises(WeightsUnavailable, match="model.onnx"):
        plugin.load("cpu", other / "model.safetensors")
    with pytest.raises(RuntimeError, match="before load"):
        plugin.run(load_image(write_ct_series(tmp_path / "ct", slices=20, size=64)))


# --- preprocessing -----------------------------------------------------------------------------------


def test_hu_window_mapping():
    hu = np.array([-3000.0, -1000.0, -300.0, 0.0, 400.0, 2000.0])
    assert window(hu, (-1000, 400)).tolist() == pytest.approx([0.0, 0.0, 0.5, 1000 / 1400, 1.0, 1.0])


@pytest.fixture(scope="module")
def prepared(chest: Case, plugin: ChestTriage) -> Prepared:
    return prepare(chest.image, plugin.config)


def test_preprocessing_of_the_shared_ct(chest: Case, prepared: Prepared):
    assert tuple(prepared.volume.shape) == (1, 1, *TINY["input_size"])
    volume = prepared.volume.numpy()
    assert volume.dtype == np.float32 and volume.min() == 0.0 and volume.max() == pytest.approx(1.0, abs=0.02)
    assert 4000 < prepared.lung_ml < 7000
    r0, r1, c0, c1 = prepared.box
    assert r1 - r0 == c1 - c0 and r1 - r0 > 0.8 * chest.image.pixels.shape[2]  # square crop around the body
    # outside the body: air (0) at the corners of the slices; a lung on each side of a middle slice
    assert volume[0, 0, :, 0, 0].max() == 0.0
    chest = volume[0, 0, 16, 16:44]
    lung = chest < 0.25
    assert lung[:, 8:28].mean() > 0.3 and lung[:, 36:56].mean() > 0.3 and lung[:, 30:34].mean() < 0.2


def _mirrored(image: Image) -> Image:
    """The same patient stored with columns towards the patient's right and slices from head to feet."""
    (row, col, normal) = image.direction
    return dataclasses.replace(image, pixels=np.ascontiguousarray(image.pixels[::-1, :, ::-1]),
                               direction=(tuple(-v for v in row), col, tuple(-v for v in normal)))


def test_orientation_a_marker_on_the_top_slice_stays_on_top(chest: Case, plugin: ChestTriage):
    (dz, dy, dx) = chest.image.spacing  # the shared CT at a quarter of its in-plane resolution, for speed
    image = dataclasses.replace(chest.image, pixels=np.ascontiguousarray(chest.image.pixels[:, ::4, ::4]),
                                spacing=(dz, 4 * dy, 4 * dx))
    assert image.direction[2][2] > 0  # slices sorted feet -> head: the top (head-most) slice is the last
    marked_pixels = image.pixels.copy()
    marked_pixels[-1, 50:78, 50:78] = 1000.0  # bright square in the middle of the top slice
    marked = dataclasses.replace(image, pixels=marked_pixels)
    mirrored, mirrored_marked = _mirrored(image), _mirrored(marked)
    plain, with_marker, flipped, flipped_marked = (prepare(i, plugin.config)
                                                   for i in (image, marked, mirrored, mirrored_marked))
    difference = (with_marker.volume - plain.volume).abs().numpy()[0, 0]
    rows = np.nonzero(difference.max(axis=(1, 2)) > 0.05)[0]
    assert rows.tolist() and rows.min() >= len(difference) - 2  # only the top end of the model's z axis changed
    # the same patient stored head-first and mirrored left-right, or with rows and columns swapped, reaches the
    # model unchanged
    assert np.array_equal(plain.volume, flipped.volume) and np.array_equal(with_marker.volume, flipped_marked.volume)
    (row, col, normal), (dz, dy, dx) = image.direction, image.spacing
    transposed = dataclasses.replace(image, pixels=np.ascontiguousarray(image.pixels.transpose(0, 2, 1)),
                                     direction=(col, row, normal), spacing=(dz, dx, dy))
    assert np.array_equal(plain.volume, prepare(transposed, plugin.config).volume)
    # a heatmap on the model's top slices lands on the top slice of each stored orientation
    cam = np.zeros((8, 4, 4), np.float32)
    cam[-1] = 1.0
    for stored, prepared, top in ((image, plain, -1), (mirrored, flipped, 0)):
        heat = heatmap_on_image(cam, prepared)
        assert heat.shape == stored.pixels.shape and heat[top].max() == pytest.approx(1.0)
        assert heat[-1 - top].max() == 0.0

# --- the shared chest CT -----------------------------------------------------------------------------


def test_chest_ct_findings(chest: Case):
    findings = chest.findings
    assert findings.not_applicable is None
    findings.validate(MANIFEST, chest.image)
    assert [c.concept for c in findings.classifications] == CONCEPTS
    assert all(0.0 <= c.probability <= 1.0 and c.threshold == 0.5 for c in findings.classifications)
    assert len({c.positive for c in findings.classifications[1:]}) == 2  # the seeded biases spread them
    (missing,) = findings.measurements
    assert (missing.concept, missing.value, missing.unit) == (MISSING_SLICES, 0.0, "%")
    (verified,) = [w for w in findings.warnings if w.startswith("body part verified: chest (lungs ")]
    assert 4000 < float(verified.split("lungs ")[1].split(" ml")[0]) < 7000
    (heat,) = findings.heatmaps
    assert heat.values.shape == chest.image.pixels.shape and heat.values.dtype == np.float32
    assert heat.values.min() >= 0.0 and heat.values.max() == pytest.approx(1.0)
    print(f"{findings.summary}; {verified}")


def test_chest_ct_outputs_are_valid_dicom(chest: Case, tmp_path: Path):
    written = write(chest, tmp_path)
    names = sorted(p.name for p in written)
    assert "SR.dcm" in names and any(n.startswith("SC-") for n in names) and "SEG.dcm" not in names
    for path in written:
        if path.suffix == ".dcm":
            assert_valid(path)
    report = hd.sr.srread(tmp_path / "SR.dcm")
    assert report.content.get_image_measurement_groups() == []
    groups = report.content.get_planar_roi_measurement_groups()  # on the border of the middle slice
    classified = [g for g in groups if g.finding_type is not None]
    assert len(classified) == 21
    for c, group in zip(chest.findings.classifications, classified, strict=True):
        assert group.finding_type.value == c.concept.value and group.finding_type.meaning == c.concept.meaning
        (probability,) = group.get_measurements()
        assert probability.value == pytest.approx(c.probability)
    (whole,) = [g for g in groups if g.tracking_identifier == "whole series"]
    (missing,) = whole.get_measurements()
    assert (missing.name.value, missing.value, missing.unit.value) == ("MISSINGSLICES", 0.0, "%")
    comments = hd.sr.utils.find_content_items(report.content[0], name=COMMENT, value_type="TEXT", recursive=True)
    assert [c.TextValue for c in comments] == chest.findings.warnings
    sr = pydicom.dcmread(tmp_path / "SR.dcm")
    assert "99RADNODE" in {str(item.CodingSchemeDesignator) for item in sr.CodingSchemeIdentificationSequence}


def test_gradcam_equals_autograd(plugin: ChestTriage, prepared: Prepared):
    net, volume = plugin.net, prepared.volume
    with torch.inference_mode():
        _, _, cam = net(volume)
    features = net.feature_map(volume).detach().requires_grad_(True)
    logit = net.pathology_head(features.mean(dim=(2, 3, 4)))[0, 0]
    (grad,) = torch.autograd.grad(logit, features)
    alpha = grad.mean(dim=(2, 3, 4), keepdim=True)  # Grad-CAM channel weights
    reference = torch.relu((alpha * features).sum(dim=1)).detach()
    assert reference.max() > 0
    assert torch.allclose(cam / cam.max(), reference / reference.max(), atol=1e-5)
    with torch.inference_mode():  # the pooled last stage is what MONAI's ResNet itself computes
        assert torch.allclose(net.feature_map(volume).mean(dim=(2, 3, 4)), net.encoder(volume), atol=1e-6)


# --- other series ------------------------------------------------------------------------------------


def test_missing_slices_are_measured(plugin: ChestTriage, tmp_path: Path):
    case = run(plugin, write_ct_series(tmp_path, kind="chest", slices=40, missing={18, 19, 20, 21}))
    assert "missing slices: 4 of 40 expected positions (10.0%)" in case.image.warnings
    case.findings.validate(MANIFEST, case.image)
    (missing,) = case.findings.measurements
    assert (missing.concept, missing.value, missing.unit) == (MISSING_SLICES, 10.0, "%")
    assert any(w.startswith("10% of the slice positions are missing") for w in case.findings.warnings)
    assert missing_slices_percent(["gantry tilt: x", "missing slices: 1 of 3 expected positions (33.3%)"]) == 33.33
    assert missing_slices_percent(()) == 0.0


def test_head_ct_is_not_applicable(plugin: ChestTriage, tmp_path: Path):
    case = run(plugin, write_ct_series(tmp_path, kind="head", slices=24, size=128))
    assert case.findings.not_applicable.startswith("no lungs: not a chest CT")
    assert not case.findings.classifications and not case.findings.heatmaps


def test_other_images_are_not_applicable(plugin: ChestTriage):
    def volume(n: int, modality: str = "CT", direction=((1, 0, 0), (0, 1, 0), (0, 0, 1))) -> Image:
        return Image(kind="volume", pixels=np.full((n, 64, 64), -1000, np.float32), spacing=(2.0, 1.0, 1.0),
                     modality=modality, direction=direction,
                     sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(n)))

    xray = Image(kind="image2d", pixels=np.zeros((64, 64), np.float32), spacing=(1.0, 1.0), modality="DX",
                 sources=(SourceRef("1.2.3", "1.2.840.10008.5.1.4.1.1.1.1"),))
    assert "volume" in plugin.run(xray).not_applicable
    assert "needs CT" in plugin.run(volume(30, "MR")).not_applicable
    assert plugin.run(volume(10)).not_applicable == "too few slices: 10 (minimum 20)"
    assert "not an axial series" in plugin.run(volume(30, direction=((0, 1, 0), (0, 0, -1), (-1, 0, 0)))).not_applicable
    assert plugin.run(volume(30)).not_applicable == "no body found in the image"


# --- ONNX --------------------------------------------------------------------------------------------


def test_onnx_export_and_backend(chest: Case, plugin: ChestTriage, weights: Path, tmp_path: Path):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    shutil.copy(weights, folder / "model.safetensors")
    report = plugin.export_onnx(folder / "model.onnx")
    print(f"ONNX export: max abs diff torch vs ONNX Runtime {report['max_abs_diff']:.3g} ({report['outputs']})")
    assert report["path"] == str(folder / "model.onnx") and report["max_abs_diff"] < 1e-4
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    onnx = loaded(folder / "model.safetensors")
    assert onnx.net is None and onnx.onnx is not None
    findings = onnx.run(chest.image)
    findings.validate(MANIFEST, chest.image)
    expected = [c.probability for c in chest.findings.classifications]
    assert [c.probability for c in findings.classifications] == pytest.approx(expected, abs=1e-5)
    assert np.abs(findings.heatmaps[0].values - chest.findings.heatmaps[0].values).max() < 1e-4
    with pytest.raises(RuntimeError, match="backend \"torch\""):
        onnx.export_onnx(tmp_path / "again.onnx")
    (folder / "config.json").write_text(json.dumps({**TINY, "input_size": [32, 64, 96], "backend": "onnx"}))
    with pytest.raises(WeightsUnavailable, match="does not fit the configuration"):
        loaded(folder / "model.safetensors")

