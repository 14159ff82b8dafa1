"""ct-organ-seg plugin: manifest and codes, configuration checks, preprocessing geometry (spacing, HU window,
orientation round trip), sliding-window stitching against a known answer, the SwinUNETR with generated weights
on the shared chest CT -> valid SEG and SR, missing weights, ONNX export parity and the ONNX backend.

The network is a tiny SwinUNETR (feature_size 12, 64^3 windows, 3 labels) with random weights: its organs are
arbitrary, which is all the plumbing needs. Its config.json also coarsens the spacing so that the 12 slices
used fit one window on a CPU; the preprocessing tests use the manifest's real spacing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from plugins.base import ONNX_FILE, Findings, Image, SourceRef, WeightsUnavailable
from plugins.ct_organ_seg import LABELS, LIVER, MANIFEST, SPLEEN, STOMACH, VOLUME
from plugins.ct_organ_seg.model import ModelGrid, OrganSegmenter, network_for, parse_config, window
from plugins.registry import build
from plugins.torch_common import save_weights
from tests.conftest import REPO
from tests.dicom_checks import assert_valid

TINY = {"feature_size": 12, "roi_size": [64, 64, 64], "labels": [LIVER, SPLEEN, STOMACH], "spacing": [5.0, 7.0, 7.0]}
CHEST_SLICES = slice(49, 61)  # 12 slices of the upper abdomen (liver, spleen, stomach) of the 64
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _models(folder: Path, seed: int = 0, **config) -> Path:
    """<folder>/ct-organ-seg/ with config.json (TINY + `config`) and random weights for it; the weights path."""
    plugin_dir = folder / MANIFEST.name
    plugin_dir.mkdir(parents=True, exist_ok=True)
    override = {**TINY, **config}
    (plugin_dir / "config.json").write_text(json.dumps(override))
    torch.manual_seed(seed)
    weights = plugin_dir / MANIFEST.weights
    save_weights(network_for(parse_config(MANIFEST, {**MANIFEST.config, **override})), weights)
    return weights


def _load(weights: Path) -> OrganSegmenter:
    plugin = build(MANIFEST)
    assert isinstance(plugin, OrganSegmenter)
    plugin.load("cpu", weights)
    return plugin


@pytest.fixture(scope="module")
def chest_paths(ct_dir: Path) -> list[Path]:
    return sorted(ct_dir.glob("1-*.dcm"))[CHEST_SLICES]


@pytest.fixture(scope="module")
def chest(chest_paths: list[Path]) -> Image:
    return load_image(chest_paths)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return _models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def plugin(weights: Path) -> OrganSegmenter:
    return _load(weights)


@pytest.fixture(scope="module")
def chest_findings(plugin: OrganSegmenter, chest: Image) -> Findings:
    t = time.perf_counter()
    findings = plugin.run(chest)
    print(f"tiny SwinUNETR on {chest.pixels.shape}: {time.perf_counter() - t:.2f} s; {findings.summary}")
    return findings


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], direction=AXIAL,
            modality: str = "CT") -> Image:
    return Image(kind="volume", pixels=np.full(shape, -1000.0, np.float32), spacing=spacing, modality=modality,
                 origin=(0.0, 0.0, 0.0), direction=direction,
                 sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(shape[0])))


# --- manifest and configuration ---------------------------------------------------------------------


def test_manifest_codes_config_and_light_import():
    m = MANIFEST
    assert (m.name, m.version, m.modalities, m.outputs, m.queue, m.weights) == (
        "ct-organ-seg", "1.0.0", ["CT"], ["SEG", "SR"], "gpu", "model.safetensors")
    assert m.findings == [VOLUME] and (VOLUME.value, VOLUME.scheme) == ("118565006", "SCT")
    codes_ = {s.label: (s.category.value, s.type.value, s.type.meaning) for s in m.segments}
    assert codes_ == {
        "spleen": ("91723000", "78961009", "Spleen"),
        "right kidney": ("91723000", "9846003", "Right kidney"),
        "left kidney": ("91723000", "18639004", "Left kidney"),
        "gallbladder": ("91723000", "28231008", "Gallbladder"),
        "esophagus": ("91723000", "32849002", "Esophagus"),
        "liver": ("91723000", "10200004", "Liver"),
        "stomach": ("91723000", "69695003", "Stomach"),
        "aorta": ("91723000", "15825003", "Aorta"),
        "inferior vena cava": ("91723000", "64131007", "Inferior vena cava"),
        "portal vein and splenic vein": ("91723000", "110765007", "Portal vein and splenic vein"),
        "pancreas": ("91723000", "15776009", "Pancreas"),
        "right adrenal gland": ("91723000", "29392005", "Right adrenal gland"),
        "left adrenal gland": ("91723000", "12003004", "Left adrenal gland"),
    }
    assert all(s.category.meaning == "Anatomical Structure" and s.type.scheme == "SCT" for s in m.segments)
    assert m.config["labels"] == LABELS == [s.label for s in m.segments]  # BTCV channel order 1..13
    cfg = parse_config(m, dict(m.config))
    assert (cfg.feature_size, cfg.roi_size, cfg.spacing, cfg.hu_window) == (48, (96, 96, 96), (2.0, 1.5, 1.5),
                                                                            (-175.0, 250.0))
    assert (cfg.overlap, cfg.mode, cfg.sw_batch_size, cfg.backend, cfg.orientation) == (0.25, "gaussian", 2, "auto",
                                                                                        "RAS")
    net = network_for({**m.config, **TINY})  # a dict as tools pass it (bench/models.py)
    assert net.out.conv.conv.out_channels == 4 and net.encoder1.layer.conv1.conv.out_channels == 12
    code = "import sys, plugins.ct_organ_seg; assert not {'torch', 'monai'} & set(sys.modules), 'manifest imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"labels": [LIVER, "kidney"]}, "does not declare as segments: kidney"),
        ({"labels": [LIVER, LIVER]}, "labels must be unique"),
        ({"roi_size": [32, 32, 32]}, "roi_size must be multiples of 32 and at least 64"),
        ({"roi_size": [64, 64, 80]}, "roi_size must be multiples of 32"),
        ({"feature_size": 16}, "feature_size"),
        ({"hu_window": [250, -175]}, "low < high"),
        ({"spacing": [2.0, 0.0, 1.5]}, "spacing must be three positive numbers"),
        ({"orientation": "RRS"}, "orientation must name each patient axis once"),
        ({"backend": "tensorrt"}, "backend"),
        ({"overlap": 1.0}, "overlap"),
        ({"heads": 3}, "unknown key(s) heads"),
    ],
)
def test_bad_configuration_makes_the_model_unavailable(tmp_path: Path, override: dict, message: str):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, **override}))
    with pytest.raises(WeightsUnavailable, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(MANIFEST).load("cpu", folder / MANIFEST.weights)


def test_missing_or_unfitting_weights_are_unavailable(tmp_path: Path, weights: Path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        build(MANIFEST).load("cpu", tmp_path / MANIFEST.name / MANIFEST.weights)
    with pytest.raises(WeightsUnavailable, match="not found"):
        build(MANIFEST).load("cpu", None)
    other = tmp_path / "other" / MANIFEST.name
    other.mkdir(parents=True)
    shutil.copy(weights, other / MANIFEST.weights)
    (other / "config.json").write_text(json.dumps({**TINY, "feature_size": 24}))  # weights are feature_size 12
    with pytest.raises(WeightsUnavailable, match="does not fit the configured architecture"):
        build(MANIFEST).load("cpu", other / MANIFEST.weights)
    (other / "config.json").write_text(json.dumps({**TINY, "labels": [LIVER]}))  # 2 output channels, weights have 4
    with pytest.raises(WeightsUnavailable, match="of another shape"):
        build(MANIFEST).load("cpu", other / MANIFEST.weights)
    (other / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    with pytest.raises(WeightsUnavailable, match="export-onnx"):
        build(MANIFEST).load("cpu", other / MANIFEST.weights)


# --- preprocessing --------------------------------------------------------------------------------------


def test_resampled_shape_follows_the_spacing_ratio(chest: Image):
    cfg = parse_config(MANIFEST, dict(MANIFEST.config))
    z, y, x = chest.pixels.shape
    sz, sy, sx = chest.spacing
    grid = ModelGrid.of(chest.pixels.shape, chest.spacing, chest.direction, cfg.spacing, cfg.orientation)
    # RAS network axes = (x, y, z) of this axial series; (z, y, x) spacing 2.0, 1.5, 1.5 mm
    assert grid.shape == (round(x * sx / 1.5), round(y * sy / 1.5), round(z * sz / 2.0)) == (287, 287, 30)
    for n, s, target in zip(grid.shape, grid.spacing, (1.5, 1.5, 2.0), strict=True):
        assert abs(s - target) * n <= target / 2  # the whole extent is kept: off by at most half a voxel
    resampled = grid.to_model(chest.pixels)
    assert resampled.shape == grid.shape and resampled.dtype == np.float32
    assert float(resampled.mean()) == pytest.approx(float(chest.pixels.mean()), abs=5.0)  # HU, not rescaled


def test_hu_window_maps_the_window_to_unit_range():
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0], np.float32)
    assert window(hu, -175.0, 250.0).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0))  # columns posterior, rows feet-ward, slices right
MIRRORED = ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))  # columns to the right, slices feet-ward


# A marker at low slice and column indices of its (z, y, x) array, at low or high rows; `halves` says in which
# half of the network's R, A, S axes it must land (True = the second half), as read off the direction cosines:
# AXIAL: low column = patient's right, low row = anterior, low slice = inferior;
# MIRRORED: low column = left, low row = anterior, low slice = superior;
# SAGITTAL: low slice = left, low column = anterior, high row = inferior.
@pytest.mark.parametrize(
    ("direction", "rows", "halves"),
    [
        (AXIAL, slice(8, 16), (True, True, False)),
        (MIRRORED, slice(8, 16), (False, True, True)),
        (SAGITTAL, slice(44, 52), (False, True, False)),
    ],
)
def test_orientation_and_marker_round_trip(direction, rows: slice, halves: tuple[bool, bool, bool]):
    shape, spacing = (24, 60, 52), (2.5, 0.8, 0.8)
    hu = np.full(shape, -1000.0, np.float32)
    marker = np.zeros(shape, bool)
    marker[4:10, rows, 6:16] = True
    hu[marker] = 1000.0
    grid = ModelGrid.of(shape, spacing, direction, (2.0, 1.5, 1.5), "RAS")
    model = grid.to_model(hu)
    centre = np.array([c.mean() for c in np.nonzero(model > 0)])
    assert tuple(bool(c > (n - 1) / 2) for c, n in zip(centre, grid.shape, strict=True)) == halves, (centre, grid)
    back = grid.to_source((model > 0).astype(np.uint8))
    assert back.shape == shape
    assert back[6, (rows.start + rows.stop) // 2, 10]  # the marker's centre voxel comes back labelled
    for axis in range(3):  # and the mask where it was, to within a voxel of the network grid
        got, want = (np.nonzero(m)[axis].mean() for m in (back, marker))
        assert abs(got - want) * spacing[axis] <= 2.0, (axis, got, want)
    dice = 2 * np.count_nonzero(back & marker) / (np.count_nonzero(back) + np.count_nonzero(marker))
    assert dice > 0.8


def _hu_classes(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Label per windowed intensity: 1 air and lung (< -154 HU), 2 dense (> 150 HU), 3 soft tissue, 0 fat."""
    return 1 * (x < 0.05) + 2 * (x > 0.765) + 3 * ((x >= 0.35) & (x <= 0.765))


def test_sliding_window_stitches_a_known_answer(plugin: OrganSegmenter, chest: Image, monkeypatch):
    # a predictor that labels each voxel by its own intensity: the Gaussian blend of 36 overlapping windows must
    # give back exactly that label on the network grid, and on the source grid the organs must be those HU
    # classes where the image has them (a flipped or transposed axis drops the Dice well below these bounds)
    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.nn.functional.one_hot(_hu_classes(windows[:, 0]).long(), 4).permute(0, 4, 1, 2, 3).float()

    monkeypatch.setattr(plugin, "net", predictor)
    monkeypatch.setattr(plugin, "config", plugin.config.model_copy(update={"spacing": (2.0, 1.5, 1.5)}))
    cfg = plugin.config
    grid = ModelGrid.of(chest.pixels.shape, chest.spacing, chest.direction, cfg.spacing, cfg.orientation)
    x = window(grid.to_model(chest.pixels), *cfg.hu_window)
    assert grid.shape == (287, 287, 30)  # 6 x 6 x 1 windows of 64
    assert np.array_equal(plugin.predict_labels(x), _hu_classes(x))

    findings = plugin.run(chest)
    findings.validate(MANIFEST, chest)
    truth = _hu_classes(window(chest.pixels, *cfg.hu_window))
    voxel_ml = float(np.prod(chest.spacing)) / 1000
    assert [s.segment for s in findings.segmentations] == cfg.labels
    for seg, value, bound in zip(findings.segmentations, (1, 2, 3), (0.97, 0.5, 0.75), strict=True):
        # bounds: 1 mm of a sharp-kernel CT resampled to 1.5-2 mm and back (noise and thin bone lose most)
        dice = 2 * np.count_nonzero(seg.mask & (truth == value)) / (np.count_nonzero(seg.mask) +
                                                                   np.count_nonzero(truth == value))
        print(f"class {value} ({seg.segment}): Dice {dice:.3f}")
        assert dice > bound, seg.segment
    for m, seg in zip(findings.measurements, findings.segmentations, strict=True):
        assert m.value == pytest.approx(np.count_nonzero(seg.mask) * voxel_ml, abs=0.005)


# --- the network on the chest CT ---------------------------------------------------------------------


def test_chest_ct_findings(chest_findings: Findings, chest: Image):
    assert chest_findings.not_applicable is None
    chest_findings.validate(MANIFEST, chest)
    found = [s.segment for s in chest_findings.segmentations]
    assert found and set(found) <= set(TINY["labels"]) and found == sorted(found, key=TINY["labels"].index)
    voxel_ml = float(np.prod(chest.spacing)) / 1000
    masks = [s.mask for s in chest_findings.segmentations]
    assert all(m.dtype == bool and m.shape == chest.pixels.shape and m.any() for m in masks)
    assert not np.any(np.sum(masks, axis=0) > 1)  # one label per voxel
    for m, seg in zip(chest_findings.measurements, chest_findings.segmentations, strict=True):
        assert (m.concept, m.unit, m.segment) == (VOLUME, "mL", seg.segment)
        assert m.value == pytest.approx(np.count_nonzero(seg.mask) * voxel_ml, abs=0.005)
    assert chest_findings.summary.startswith(f"{len(found)} of 3 organs: ")


def test_chest_ct_outputs_are_valid_seg_and_sr(chest_findings: Findings, chest: Image, chest_paths: list[Path],
                                               tmp_path: Path):
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in chest_paths}
    paths_by_uid = {str(ds.SOPInstanceUID): p for p, ds in headers.items()}
    series_uid = str(next(iter(headers.values())).SeriesInstanceUID)
    written = write_outputs(chest_findings, chest, read_sources(chest, paths_by_uid), Provenance(MANIFEST),
                            series_uid, tmp_path, meta={})
    assert sorted(p.name for p in written if p.suffix == ".dcm") == ["SEG.dcm", "SR.dcm"]
    for path in written:
        if path.suffix == ".dcm":
            assert_valid(path)

    seg = hd.seg.segread(tmp_path / "SEG.dcm")
    specs = {s.label: s for s in MANIFEST.segments}
    labels = [s.segment for s in chest_findings.segmentations]
    assert [item.SegmentLabel for item in seg.SegmentSequence] == labels
    for item in seg.SegmentSequence:
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == specs[item.SegmentLabel].type.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    order = [s.sop_instance_uid for s in chest.sources]
    referenced = {u for _, _, u in seg.get_source_image_uids()}
    assert referenced <= set(order)
    for number, found in enumerate(chest_findings.segmentations, start=1):
        covered = [uid for uid, plane in zip(order, found.mask, strict=True) if plane.any()]
        assert set(covered) <= referenced
        recovered = seg.get_pixels_by_source_instance(covered, segment_numbers=[number], skip_overlap_checks=True)
        expected = np.stack([plane for plane in found.mask if plane.any()])
        assert np.array_equal(recovered[..., 0].astype(bool), expected), found.segment
    for item in seg.PerFrameFunctionalGroupsSequence:  # each frame sits on the slice it references
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in headers[paths_by_uid[uid]].ImagePositionPatient], atol=1e-3)

    report = hd.sr.srread(tmp_path / "SR.dcm")
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == labels
    voxel_ml = float(np.prod(chest.spacing)) / 1000
    for group, found in zip(groups, chest_findings.segmentations, strict=True):
        assert group.referenced_segment.referenced_segment_numbers == [labels.index(found.segment) + 1]
        (measurement,) = group.get_measurements()
        assert measurement.name == hd.sr.CodedConcept(VOLUME.value, VOLUME.scheme, VOLUME.meaning)
        assert measurement.unit == hd.sr.CodedConcept("mL", "UCUM", "milliliter")
        assert measurement.value == pytest.approx(np.count_nonzero(found.mask) * voxel_ml, abs=0.005)


def test_onnx_export_parity_and_onnx_backend(plugin: OrganSegmenter, weights: Path, chest: Image,
                                             chest_findings: Findings, tmp_path: Path):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    t = time.perf_counter()
    report = plugin.export_onnx(folder / ONNX_FILE)
    print(f"ONNX export and check {time.perf_counter() - t:.1f} s: {report}")
    assert report["path"] == str(folder / ONNX_FILE) and (folder / ONNX_FILE).is_file()
    assert report["input_shape"] == [1, 1, 64, 64, 64]
    assert report["max_abs_diff"] < 1e-3 < report["max_abs_logit"]

    shutil.copy(weights, folder / MANIFEST.weights)
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    onnx = _load(folder / MANIFEST.weights)
    assert onnx.net is None and onnx.onnx is not None
    findings = onnx.run(chest)
    findings.validate(MANIFEST, chest)
    torch_masks = {s.segment: s.mask for s in chest_findings.segmentations}
    onnx_masks = {s.segment: s.mask for s in findings.segmentations}
    assert onnx_masks.keys() == torch_masks.keys()
    for organ, mask in torch_masks.items():
        assert np.mean(mask == onnx_masks[organ]) > 0.999, organ  # a float32 rounding may flip a near tie
    with pytest.raises(RuntimeError, match="no torch model"):
        onnx.export_onnx(tmp_path / "again.onnx")

    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx", "roi_size": [64, 64, 96]}))
    with pytest.raises(WeightsUnavailable, match="export it again"):
        _load(folder / MANIFEST.weights)


def test_other_images_are_not_applicable(plugin: OrganSegmenter):
    xray = Image(kind="image2d", pixels=np.zeros((64, 64), np.float32), spacing=(1.0, 1.0), modality="DX",
                 sources=(SourceRef("1.2.3", "1.2.840.10008.5.1.4.1.1.1.1"),))
    assert "CT volume" in plugin.run(xray).not_applicable
    assert "needs CT, got MR" in plugin.run(_volume((12, 64, 64), (5.0, 1.0, 1.0), modality="MR")).not_applicable
    s = 2 ** -0.5
    oblique = ((s, s, 0.0), (-s, s, 0.0), (0.0, 0.0, 1.0))
    assert "oblique" in plugin.run(_volume((12, 64, 64), (5.0, 1.0, 1.0), direction=oblique)).not_applicable
