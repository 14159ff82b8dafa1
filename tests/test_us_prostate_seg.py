"""us-prostate-seg plugin: preprocessing (grey, scan area, letterbox round trip, Perona-Malik diffusion), the FPN
with generated weights on the shared ultrasound files (multi-frame, colour, compressed), masks and areas mapped
back onto the frames, valid SEG/SR/SC outputs, missing or unfitting weights, and ONNX parity.

The network runs with a tiny configuration (resnet18, 16 FPN channels, 128 px) and generated weights; tests of
what `run` does with the probabilities replace the network by a known function of the input (`predict`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from plugins.base import Findings, Image, SourceRef, WeightsUnavailable
from plugins.registry import build
from plugins.torch_common import save_weights
from plugins.us_prostate_seg import AREA, HEATMAP, MANIFEST, PROSTATE
from plugins.us_prostate_seg.model import NO_CALIBRATION, ModelConfig, network
from plugins.us_prostate_seg.preprocess import (
    Box,
    Letterbox,
    anisotropic_diffusion,
    content_box,
    normalise,
    scan_area,
    to_grey,
)
from tests.conftest import REPO
from tests.dicom_checks import assert_valid

TINY = {"encoder": "resnet18", "fpn_channels": 16, "size": 128}
CINE = "examples_ybr_color.dcm"  # SonoSite, 30 frames 240x320, JPEG baseline YBR_FULL_422, calibrated
RLE = "OBXXXX1A_rle_2frame.dcm"  # Philips, 2 frames 600x800, RLE palette colour, calibrated
STILL = "JPGLosslessP14SV1_1s_1f_8b.dcm"  # Philips, 1 frame 768x1024, JPEG lossless MONOCHROME2, calibrated
UNCALIBRATED = "US1_UNCR.dcm"  # GE, 1 frame 480x640 RGB, no SequenceOfUltrasoundRegions
BRIGHT = 230.0  # the stand-in network's decision level: only painted discs (255) are brighter than tissue


def _us(data_root: Path, name: str) -> Path:
    return data_root / "us_samples_pydicom" / name


def _write(findings: Findings, image: Image, path: Path, out: Path) -> list[Path]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sources = read_sources(image, {str(ds.SOPInstanceUID): path})
    return write_outputs(findings, image, sources, Provenance(MANIFEST), str(ds.SeriesInstanceUID), out, meta={})


def _single_frame_refs(image: Image) -> Image:
    """The image as node.imaging should build it: a single-frame instance's SourceRef without a frame number.
    node.imaging gives it frame_number 1, and sr.py then writes a ReferencedFrameNumber to a single-frame SOP
    class, which dciodvfy rejects (test_single_frame_source_sr_is_valid, expected to fail until fixed)."""
    if len(image.sources) != 1:
        return image
    return replace(image, sources=(replace(image.sources[0], frame_number=None),))


def _regions(path: Path) -> list[dict]:
    """SequenceOfUltrasoundRegions as a list of dicts keyed by DICOM keywords (how Image.attrs would carry it)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [{e.keyword: e.value for e in region} for region in ds.SequenceOfUltrasoundRegions]


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _bright_disc_network(batch: np.ndarray) -> np.ndarray:
    """Stands in for the FPN: probability high where the preprocessed grey level exceeds BRIGHT."""
    cfg = ModelConfig.model_validate(MANIFEST.config)
    grey = (batch[:, 0] * cfg.std + cfg.mean) * 255.0
    return (1.0 / (1.0 + np.exp(-(grey - BRIGHT) / 4.0))).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """<models dir>/us-prostate-seg with the tiny config.json and generated weights."""
    folder = tmp_path_factory.mktemp("models") / MANIFEST.name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    save_weights(network(MANIFEST.config | TINY), folder / MANIFEST.weights)
    return folder


@pytest.fixture(scope="module")
def plugin(models: Path):
    plugin = build(MANIFEST)
    plugin.load("cpu", models / MANIFEST.weights)
    return plugin


@pytest.fixture
def stand_in(plugin, monkeypatch):
    """The loaded plugin with the network replaced by `_bright_disc_network`."""
    monkeypatch.setattr(plugin, "predict", _bright_disc_network)
    return plugin


@pytest.fixture(scope="module")
def cine(data_root: Path) -> Image:
    return load_image([_us(data_root, CINE)])


# --- manifest and configuration ---------------------------------------------------------------------


def test_manifest_and_light_import():
    assert MANIFEST.name == "us-prostate-seg" and MANIFEST.version == "1.0.0" and MANIFEST.queue == "gpu"
    assert MANIFEST.modalities == ["US"] and MANIFEST.outputs == ["SEG", "SR", "SC"]
    assert MANIFEST.weights == "model.safetensors"
    (segment,) = MANIFEST.segments
    assert (segment.label, segment.category.value, segment.type.value) == (PROSTATE, "91723000", "41216001")
    assert MANIFEST.findings == [AREA] and AREA.value == "42798000"
    cfg = ModelConfig.model_validate(MANIFEST.config)
    assert (cfg.encoder, cfg.fpn_channels, cfg.size, cfg.backend) == ("resnet34", 128, 768, "auto")
    assert cfg.diffusion.model_dump() == {"iterations": 10, "kappa": 30, "gamma": 0.15, "option": 1}
    code = ("import sys, plugins.us_prostate_seg; "
            "assert not {'torch', 'timm'} & set(sys.modules), 'the manifest imports torch or timm'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_full_size_network_is_an_fpn_on_resnet34():
    net = network(MANIFEST.config)
    assert net.encoder.feature_info.channels() == [64, 128, 256, 512]
    assert [conv.out_channels for conv in net.lateral] == [128] * 4
    assert [conv.kernel_size for conv in net.smooth] == [(3, 3)] * 4
    tiny = network(MANIFEST.config | TINY).eval()
    with torch.inference_mode():
        out = tiny(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 64, 64) and float(out.min()) >= 0 and float(out.max()) <= 1


# --- preprocessing --------------------------------------------------------------------------------


def test_rgb_to_grey_is_bt601_luma():
    rgb = np.zeros((1, 2, 3, 3), dtype=np.uint8)
    rgb[0, 0, 0], rgb[0, 0, 1], rgb[0, 0, 2], rgb[0, 1, :] = (255, 0, 0), (0, 255, 0), (0, 0, 255), 255
    grey = to_grey(rgb)
    assert grey.dtype == np.float32 and grey.shape == (1, 2, 3)
    assert grey[0, 0] == pytest.approx([0.299 * 255, 0.587 * 255, 0.114 * 255], abs=1e-3)
    assert grey[0, 1] == pytest.approx([255, 255, 255], abs=1e-3)
    already = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    assert np.array_equal(to_grey(already), already.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_grey(np.zeros((3, 4)))


def test_diffusion_removes_noise_and_keeps_the_edge():
    rng = np.random.default_rng(0)
    clean = np.where(np.arange(96) < 48, 60.0, 160.0)[np.newaxis, np.newaxis, :].repeat(96, axis=1)
    noisy = np.concatenate([clean + rng.normal(0, 10, clean.shape), clean + rng.normal(0, 10, clean.shape)])
    flat = np.s_[:, :, 8:40], np.s_[:, :, 56:88]
    for option, kept in ((1, 95), (2, 75)):  # option 2 lets more flow across strong edges
        out = anisotropic_diffusion(noisy, iterations=10, kappa=30, gamma=0.15, option=option)
        assert out.dtype == np.float32 and out.shape == noisy.shape
        for region in flat:
            print(f"option {option}: noise std {noisy[region].std():.2f} -> {out[region].std():.2f}")
            assert out[region].std() < 0.4 * noisy[region].std()
        step = out[:, :, 48].mean() - out[:, :, 47].mean()  # the two columns either side of the edge
        assert step > kept, step  # of 100: the edge stays sharp
        assert np.allclose(out[1], anisotropic_diffusion(noisy[1:], 10, 30, 0.15, option)[0], atol=1e-4)
    isotropic = ndimage.gaussian_filter(noisy[0], 1.5)  # comparable smoothing without edge stopping blurs it
    assert isotropic[:, 48].mean() - isotropic[:, 47].mean() < 50
    assert np.array_equal(anisotropic_diffusion(noisy, 0, 30, 0.15, 1), noisy.astype(np.float32))
    for kwargs, message in [({"option": 3}, "option"), ({"gamma": 0.3}, "gamma"), ({"kappa": 0}, "kappa")]:
        with pytest.raises(ValueError, match=message):
            anisotropic_diffusion(noisy, **({"iterations": 1, "kappa": 30, "gamma": 0.15, "option": 1} | kwargs))


@pytest.mark.parametrize("size", [128, 512])  # shrinking (antialiased) and enlarging
def test_letterbox_round_trip_maps_a_marker_back_to_its_pixel(size: int):
    box = Letterbox(175, 152, size)  # the shared cine's scan area
    assert box.scale == pytest.approx(size / 175)
    assert box.pad[0] == pytest.approx(0) and box.pad[1] == pytest.approx((size - 152 * size / 175) / 2)
    centre = (40, 101)
    frame = np.where(_disc((175, 152), centre, 6), 255.0, 40.0)[np.newaxis].astype(np.float32)
    model = box.to_model(frame)
    assert model.shape == (1, size, size)
    assert not model[0, :, : int(box.pad[1]) - 1].any() and not model[0, :, size - int(box.pad[1]) + 1 :].any()
    expected = box.point_to_model(*centre)
    found = ndimage.center_of_mass(model[0] > 150)
    assert found == pytest.approx(expected, abs=0.5)
    back = box.to_frame(model / 255.0)[0] > 0.5
    assert back[centre] and back.shape == (175, 152)
    assert ndimage.center_of_mass(back) == pytest.approx(centre, abs=0.5)
    assert abs(int(back.sum()) - int(_disc((175, 152), centre, 6).sum())) <= 12


def test_scan_area_from_the_content_or_the_calibrated_region(data_root: Path):
    rle = load_image([_us(data_root, RLE)])
    box = content_box(rle.pixels)
    assert box.y0 >= 60  # not the blue vendor banner at the top, nor the grey bar at the right
    assert 300 < box.x0 < box.x1 < 620 and box.y1 < 300  # the sector (tissue near the probe)
    regions = _regions(_us(data_root, RLE))
    area = scan_area(rle.pixels, {"SequenceOfUltrasoundRegions": regions})
    assert (area.source, area.box, area.spacing_trusted, area.warnings) == ("region", Box(60, 120, 519, 800), True, [])
    area = scan_area(rle.pixels, {"SequenceOfUltrasoundRegions": regions + [dict(regions[0])]})
    assert area.source == "region" and "split screen" in area.warnings[0]
    cine = load_image([_us(data_root, CINE)])  # its region was written for 480x640 frames, the pixels are 240x320
    area = scan_area(cine.pixels, {"SequenceOfUltrasoundRegions": _regions(_us(data_root, CINE))})
    assert area.source == "content" and not area.spacing_trusted
    assert "does not lie inside the 240x320 frame" in area.warnings[0]
    assert scan_area(cine.pixels, {}) == replace(area, spacing_trusted=True, warnings=[])
    assert scan_area(np.zeros((2, 50, 60), np.uint8), {}).box == Box(0, 0, 50, 60)  # nothing: the whole frame


def test_normalise():
    assert normalise(np.array([0.0, 255.0], np.float32), 0.5, 0.25) == pytest.approx([-2.0, 2.0])


# --- run: what happens to the probabilities --------------------------------------------------------


def test_masks_areas_and_outputs_on_the_frames_with_the_prostate(stand_in, cine: Image, data_root: Path,
                                                                  tmp_path: Path):
    pixels = cine.pixels.copy()
    discs = {3: ((110, 170), 18), 7: ((100, 160), 24)}  # frame index -> centre, radius (inside the sector)
    for k, (centre, radius) in discs.items():
        pixels[k][_disc(pixels.shape[1:3], centre, radius)] = 255
    # the file's calibration region was written for 480x640 frames, so the loader does not trust it; here
    # the cine stands in for a calibrated one (its spacing as given, no region to crop to)
    assert cine.attrs["calibrated"] is False and "lies outside the 320 x 240 frame" in " ".join(cine.warnings)
    image = replace(cine, pixels=pixels, spacing=(0.51, 0.51),
                    attrs={**cine.attrs, "calibrated": True, "SequenceOfUltrasoundRegions": []})
    findings = stand_in.run(image)
    findings.validate(MANIFEST, image)
    print(findings.summary, findings.warnings)
    (seg,) = findings.segmentations
    assert seg.segment == PROSTATE and seg.mask.shape == pixels.shape[:3]
    assert [int(k) for k in np.flatnonzero(seg.mask.any(axis=(1, 2)))] == [3, 7]
    pixel_mm2 = image.spacing[0] * image.spacing[1]
    for k, (centre, radius) in discs.items():
        truth = _disc(pixels.shape[1:3], centre, radius)
        dice = 2 * np.count_nonzero(seg.mask[k] & truth) / (np.count_nonzero(seg.mask[k]) + np.count_nonzero(truth))
        assert dice > 0.9, (k, dice)
    areas = {m.frame: m for m in findings.measurements}
    assert set(areas) == {3, 7, None} and all(m.concept == AREA and m.unit == "mm2" for m in areas.values())
    for k in (3, 7):
        assert areas[k].value == pytest.approx(np.count_nonzero(seg.mask[k]) * pixel_mm2, abs=0.05)
    assert areas[None].value == areas[7].value > areas[3].value
    (heat,) = findings.heatmaps
    assert heat.name == HEATMAP and heat.values.shape == seg.mask.shape
    assert [int(k) for k in np.flatnonzero(heat.values.any(axis=(1, 2)))] == [7]  # the largest frame only
    assert "prostate on 2 of 30 frame(s); largest on frame 8" in findings.summary

    written = _write(findings, image, _us(data_root, CINE), tmp_path)
    names = sorted(p.name for p in written if p.suffix == ".dcm")
    # the heatmap SC, then the outline SCs (US has no frame of reference: a PACS shows these, not the SEG)
    assert names == ["SC-001.dcm", "SC-002.dcm", "SC-003.dcm", "SEG.dcm", "SR.dcm"]
    for path in written:
        if path.suffix == ".dcm":
            assert_valid(path)
    source_uid = cine.sources[0].sop_instance_uid
    seg_ds = pydicom.dcmread(tmp_path / "SEG.dcm")
    refs = [item.DerivationImageSequence[0].SourceImageSequence[0] for item in seg_ds.PerFrameFunctionalGroupsSequence]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [4, 8]
    assert {r.ReferencedSOPInstanceUID for r in refs} == {source_uid}
    stored = hd.seg.segread(tmp_path / "SEG.dcm")
    assert np.array_equal(np.asarray(stored.get_stored_frame(1)).astype(bool), seg.mask[3])
    assert np.array_equal(np.asarray(stored.get_stored_frame(2)).astype(bool), seg.mask[7])
    report = hd.sr.srread(tmp_path / "SR.dcm")
    assert report.content.get_image_measurement_groups() == []
    groups = [g for g in report.content.get_planar_roi_measurement_groups() if "frame" in g.tracking_identifier]
    refs = [g.roi.ContentSequence[0].ReferencedSOPSequence[0] for g in groups]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [4, 8]
    assert [g.tracking_identifier for g in groups] == ["prostate, frame 4", "prostate, frame 8"]
    for k, group in zip((3, 7), groups, strict=True):
        ((name, value, unit),) = [(m.name, m.value, m.unit) for m in group.get_measurements()]
        assert name.value == AREA.value and unit.value == "mm2" and value == pytest.approx(areas[k].value)
    (volume_group,) = report.content.get_volumetric_roi_measurement_groups()
    assert volume_group.referenced_segment.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
    assert [m.value for m in volume_group.get_measurements()] == [pytest.approx(areas[None].value)]
    sc = pydicom.dcmread(tmp_path / "SC-001.dcm")
    assert int(sc.SourceImageSequence[0].ReferencedFrameNumber) == 8
    outlines = [pydicom.dcmread(tmp_path / f"SC-00{k}.dcm") for k in (2, 3)]
    assert [int(o.SourceImageSequence[0].ReferencedFrameNumber) for o in outlines] == [4, 8]
    assert all("Outline" in o.DerivationDescription for o in outlines)


def test_no_prostate_gives_no_segment(stand_in, cine: Image):
    findings = stand_in.run(cine)  # no painted disc: nothing is brighter than BRIGHT
    findings.validate(MANIFEST, cine)
    assert not findings.segmentations and not findings.measurements and not findings.heatmaps
    assert findings.summary == "no prostate found on 30 frame(s)"


def test_uncalibrated_image_reports_no_area(stand_in, data_root: Path, tmp_path: Path):
    image = load_image([_us(data_root, UNCALIBRATED)])
    assert "pixel spacing unknown" in image.warnings
    pixels = image.pixels.copy()
    pixels[0][_disc(pixels.shape[1:3], (220, 320), 40)] = 255
    image = _single_frame_refs(replace(image, pixels=pixels))
    findings = stand_in.run(image)
    findings.validate(MANIFEST, image)
    assert NO_CALIBRATION in findings.warnings and not findings.measurements
    assert findings.segmentations[0].mask[0, 220, 320] and "mm2" not in findings.summary
    for path in _write(findings, image, _us(data_root, UNCALIBRATED), tmp_path):
        if path.suffix == ".dcm":
            assert_valid(path)


def test_single_grey_frame_has_one_area(stand_in, data_root: Path):
    image = load_image([_us(data_root, STILL)])
    assert image.pixels.shape == (1, 768, 1024)
    pixels = image.pixels.copy()
    pixels[0][_disc(pixels.shape[1:3], (420, 520), 50)] = 255
    findings = stand_in.run(replace(image, pixels=pixels))
    (area,) = findings.measurements
    assert area.frame is None
    assert area.value == pytest.approx(np.count_nonzero(findings.segmentations[0].mask) * image.spacing[0] ** 2,
                                       abs=0.05)
    # the stand-in's level near white sits inside the disc's edge, blurred by the 5.6x shrink to 128 px: 1-2 px less
    assert area.value == pytest.approx(np.pi * 50**2 * image.spacing[0] ** 2, rel=0.12)


def test_single_frame_source_sr_is_valid(stand_in, data_root: Path, tmp_path: Path):
    image = load_image([_us(data_root, STILL)])
    pixels = image.pixels.copy()
    pixels[0][_disc(pixels.shape[1:3], (420, 520), 50)] = 255
    image = replace(image, pixels=pixels)
    findings = stand_in.run(image)
    _write(findings, image, _us(data_root, STILL), tmp_path)
    assert_valid(tmp_path / "SR.dcm")


def test_still_image2d_and_other_kinds(stand_in):
    grey = np.full((200, 260), 0.3, dtype=np.float32)
    grey[_disc(grey.shape, (90, 120), 30)] = 1.0
    image = Image(kind="image2d", pixels=grey, spacing=(0.2, 0.2), modality="US",
                  sources=(SourceRef("1.2.3", "1.2.840.10008.5.1.4.1.1.6.1"),))
    findings = stand_in.run(image)
    findings.validate(MANIFEST, image)
    assert findings.segmentations[0].mask.shape == grey.shape and findings.heatmaps[0].values.shape == grey.shape
    (area,) = findings.measurements
    assert area.frame is None and area.value == pytest.approx(np.pi * 30**2 * 0.04, rel=0.05)
    volume = Image(kind="volume", pixels=np.zeros((3, 8, 8), np.float32), spacing=(1, 1, 1), modality="CT",
                   sources=tuple(SourceRef(f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.2") for i in range(3)))
    assert "ultrasound frames" in stand_in.run(volume).not_applicable


# --- the network ------------------------------------------------------------------------------------


def test_network_on_the_cine_gives_valid_outputs(plugin, cine: Image, data_root: Path, tmp_path: Path):
    t = time.perf_counter()
    findings = plugin.run(cine)
    seconds = time.perf_counter() - t
    print(f"tiny FPN on {cine.pixels.shape}: {seconds:.2f} s ({1000 * seconds / 30:.0f} ms/frame); {findings.summary}")
    findings.validate(MANIFEST, cine)
    assert not findings.not_applicable
    for path in _write(findings, cine, _us(data_root, CINE), tmp_path):
        if path.suffix == ".dcm":
            assert_valid(path)
    if findings.segmentations:  # generated weights: whatever they find, the outputs must describe it
        mask = findings.segmentations[0].mask
        frames = [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]
        # the cine's calibration does not fit its frames: no areas, and the warning says why
        assert not findings.measurements and "no physical calibration: areas not reported" in findings.warnings
        seg_ds = pydicom.dcmread(tmp_path / "SEG.dcm")
        refs = [int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                for item in seg_ds.PerFrameFunctionalGroupsSequence]
        assert refs == [k + 1 for k in frames]


def test_missing_or_unfitting_weights_are_unavailable(models: Path, cine: Image, tmp_path: Path):
    plugin = build(MANIFEST)
    with pytest.raises(RuntimeError, match="not loaded"):
        plugin.run(cine)
    with pytest.raises(WeightsUnavailable, match="not found"):
        plugin.load("cpu", tmp_path / "none" / MANIFEST.weights)
    with pytest.raises(WeightsUnavailable, match="not found"):
        plugin.load("cpu", None)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(models / MANIFEST.weights, other)  # resnet18 weights, no config.json: the resnet34 architecture
    with pytest.raises(WeightsUnavailable, match="does not fit the configured architecture"):
        plugin.load("cpu", other / MANIFEST.weights)
    for config, message in [({"size": 100}, "size"), ({"encoder": "no_such_net"}, "no_such_net"),
                            ({"diffusion": {"iterations": 1, "kappa": 1, "gamma": 0.5, "option": 1}}, "gamma"),
                            ({"heads": 3}, "unknown key")]:
        (other / "config.json").write_text(json.dumps(TINY | config))
        with pytest.raises(WeightsUnavailable, match=message):
            plugin.load("cpu", other / MANIFEST.weights)
    (other / "config.json").write_text(json.dumps(TINY | {"backend": "onnx"}))
    with pytest.raises(WeightsUnavailable, match="model.onnx"):
        plugin.load("cpu", other / MANIFEST.weights)


def test_onnx_export_parity_and_backend(plugin, models: Path, data_root: Path, tmp_path: Path):
    folder = tmp_path / MANIFEST.name
    shutil.copytree(models, folder)
    report = plugin.export_onnx(folder / "model.onnx")
    print(f"ONNX export: max abs diff torch vs ONNX Runtime {report['max_abs_diff']:.3g} on {report['input']}")
    assert report["path"] == str(folder / "model.onnx") and report["max_abs_diff"] < 1e-4
    (folder / "config.json").write_text(json.dumps(TINY | {"backend": "onnx"}))
    (folder / MANIFEST.weights).unlink()  # backend onnx needs model.onnx instead of the torch weights
    onnx = build(MANIFEST)
    onnx.load("cpu", folder / MANIFEST.weights)
    image = load_image([_us(data_root, RLE)])
    by_torch, by_onnx = plugin.run(image), onnx.run(image)
    by_onnx.validate(MANIFEST, image)
    with pytest.raises(RuntimeError, match="torch backend"):
        onnx.export_onnx(tmp_path / "again.onnx")
    assert by_onnx.summary == by_torch.summary
    for a, b in zip(by_torch.heatmaps, by_onnx.heatmaps, strict=True):
        assert np.max(np.abs(a.values - b.values)) < 1e-4
    for a, b in zip(by_torch.segmentations, by_onnx.segmentations, strict=True):
        assert np.count_nonzero(a.mask != b.mask) <= 0.001 * a.mask.size
    (folder / "config.json").write_text(json.dumps(TINY | {"backend": "onnx", "size": 160}))
    with pytest.raises(WeightsUnavailable, match="export it again"):
        build(MANIFEST).load("cpu", folder / MANIFEST.weights)
