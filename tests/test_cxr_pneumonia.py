"""cxr-pneumonia plugin: letterbox pre-processing and polarity on the shared X-rays, heatmap geometry, runs with
a tiny ViT of the same architecture family (weights generated here) whose SR/SC outputs pass dciodvfy, weights
and configuration errors, ONNX parity and determinism."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import timm
import torch
from pydicom.dataset import Dataset

from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from plugins.base import Image, SourceRef, WeightsUnavailable
from plugins.cxr_pneumonia import HEATMAP, MANIFEST, PNEUMONIA
from plugins.cxr_pneumonia.model import (
    CxrConfig,
    Letterbox,
    RolloutViT,
    attention_rollout,
    create_model,
    heatmap_to_image,
    letterbox,
    normalise,
    preprocess,
    read_config,
)
from plugins.registry import build
from plugins.torch_common import OnnxModel, export_onnx, save_weights
from tests.conftest import REPO
from tests.dicom_checks import assert_valid

TINY = {"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
XRAYS = {
    "cr-mono1": "cxr_nema_wg04_rg1/RG1_UNCR.dcm",
    "cr-mono1-j2k-lossless": "cxr_nema_wg04_rg1/RG1_J2KR.dcm",
    "cr-mono1-j2k-lossy": "cxr_nema_wg04_rg1/RG1_J2KI.dcm",
    "sc-dx-mono2": "cxr_nih_google_dicom/nih_cxr_google_sc_dx.dcm",
}
SUMMARY = re.compile(r"^(NORMAL|PNEUMONIA) \(p=(0|1)\.\d\d\)$")


def tiny_config(**override) -> CxrConfig:
    return read_config({**MANIFEST.config, **TINY, **override})


def write_models(folder: Path, seed: int = 0, **config) -> Path:
    """<folder>/cxr-pneumonia/{config.json, model.safetensors} for the tiny ViT; returns the weights path."""
    plugin_dir = folder / MANIFEST.name
    plugin_dir.mkdir(parents=True, exist_ok=True)
    (plugin_dir / "config.json").write_text(json.dumps({**TINY, **config}))
    torch.manual_seed(seed)
    return save_weights(create_model(tiny_config()), plugin_dir / MANIFEST.weights)


def loaded(weights: Path):
    plugin = build(MANIFEST)
    plugin.load("cpu", weights)
    return plugin


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def plugin(weights: Path):
    return loaded(weights)


@pytest.fixture(scope="module")
def xrays(data_root: Path) -> dict[str, tuple[Path, Image]]:
    out = {}
    for name, rel in XRAYS.items():
        path = data_root / rel
        out[name] = (path, load_image([path]))
    return out


# --- the manifest and the configuration -------------------------------------------------------------------


def test_manifest_and_light_import():
    assert (MANIFEST.name, MANIFEST.version, MANIFEST.queue) == ("cxr-pneumonia", "1.0.0", "gpu")
    assert MANIFEST.modalities == ["CR", "DX"] and MANIFEST.outputs == ["SR", "SC"]
    assert MANIFEST.findings == [PNEUMONIA] and PNEUMONIA.value == "233604007" and PNEUMONIA.scheme == "SCT"
    assert MANIFEST.series.body_parts == ["CHEST"] and MANIFEST.weights == "model.safetensors"
    config = read_config(MANIFEST.config)
    assert (config.model_name, config.img_size, config.backend) == ("vit_base_patch16_224", 224, "auto")
    assert config.classes == ("NORMAL", "PNEUMONIA") and config.positive == 1 and config.threshold == 0.5
    assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
    code = ("import sys, plugins.cxr_pneumonia; heavy = {'torch', 'timm', 'onnxruntime'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"colour": "blue"}, "unknown key"),
        ({"classes": ["NORMAL", "COVID"]}, "one of them PNEUMONIA"),
        ({"classes": ["NORMAL", "VIRAL", "PNEUMONIA"]}, "classes"),
        ({"std": [0.2, 0.0, 0.2]}, "std values must be positive"),
        ({"threshold": 1.5}, "threshold"),
        ({"backend": "tensorrt"}, "backend"),
        ({"img_size": 72}, "not a multiple of vit_base_patch16_224's patch size"),
        ({"model_name": "no_such_model"}, "timm cannot build no_such_model"),
        ({"model_kwargs": {"depth": 2, "no_such_argument": 1}}, "timm cannot build"),
        ({"model_name": "mixer_s16_224", "model_kwargs": {}}, "not a timm VisionTransformer"),
        ({"model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "class_token": False,
                           "global_pool": "avg"}}, "class token"),
    ],
)
def test_bad_configuration_is_unavailable(tmp_path: Path, weights: Path, override: dict, message: str):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    shutil.copy(weights, folder / MANIFEST.weights)
    (folder / "config.json").write_text(json.dumps({**TINY, **override}))
    with pytest.raises(WeightsUnavailable, match=message):
        loaded(folder / MANIFEST.weights)


# --- weights ------------------------------------------------------------------------------------------------


def test_missing_weights_are_unavailable(tmp_path: Path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        loaded(tmp_path / MANIFEST.name / MANIFEST.weights)
    with pytest.raises(WeightsUnavailable, match="weights"):
        loaded(None)


@pytest.mark.parametrize(
    ("model_kwargs", "message"),
    [
        ({"depth": 2, "embed_dim": 48, "num_heads": 2}, r"of another shape \(e\.g\. "),
        ({"depth": 3, "embed_dim": 32, "num_heads": 2}, r"unexpected \(e\.g\. blocks\.2\."),
    ],
)
def test_weights_of_another_architecture_are_unavailable(tmp_path: Path, model_kwargs: dict, message: str):
    folder = tmp_path / MANIFEST.name
    save_weights(create_model(tiny_config(model_kwargs=model_kwargs)), folder / MANIFEST.weights)
    (folder / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(WeightsUnavailable, match="does not fit the configured architecture") as info:
        loaded(folder / MANIFEST.weights)
    assert re.search(message, str(info.value)), info.value
    print(info.value)


def test_a_file_that_is_not_safetensors_is_unavailable(tmp_path: Path):
    path = tmp_path / MANIFEST.name / MANIFEST.weights
    path.parent.mkdir()
    (path.parent / "config.json").write_text(json.dumps(TINY))
    path.write_bytes(b"PK\x03\x04 a pytorch zip checkpoint, not safetensors")
    with pytest.raises(WeightsUnavailable, match="not a safetensors file"):
        loaded(path)


# --- pre-processing -----------------------------------------------------------------------------------------


def test_letterbox_keeps_the_aspect_ratio_and_pads_black():
    portrait = np.ones((100, 50), np.float32)
    canvas, box = letterbox(portrait, 64)
    assert canvas.shape == (64, 64) and canvas.dtype == np.float32
    assert box == Letterbox(shape=(100, 50), size=64, top=0, left=16, height=64, width=32)
    assert (canvas[:, :16] == 0).all() and (canvas[:, 48:] == 0).all() and (canvas[:, 16:48] == 1).all()
    landscape = np.full((30, 90), 0.5, np.float32)
    canvas, box = letterbox(landscape, 64)
    assert (box.top, box.left, box.height, box.width) == (21, 0, 21, 64)
    assert (canvas[:21] == 0).all() and (canvas[42:] == 0).all() and np.allclose(canvas[21:42], 0.5)

    config = tiny_config()
    x, box = preprocess(portrait, config)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    for c in range(3):
        pad, image = (0.0 - config.mean[c]) / config.std[c], (1.0 - config.mean[c]) / config.std[c]
        assert np.allclose(x[0, c, :, :16], pad) and np.allclose(x[0, c, :, 16:48], image)
    assert np.array_equal(normalise(canvas, (0.5,) * 3, (0.5,) * 3)[0, 1], canvas * 2 - 1)
    with pytest.raises(ValueError, match="2-D"):
        letterbox(np.zeros((2, 8, 8), np.float32), 64)


def _lungs_and_mediastinum(canvas: np.ndarray, box: Letterbox) -> tuple[float, float]:
    """Mean grey of the lung fields (the middle third of the rows at 1/8-3/8 and 5/8-7/8 of the width) and of
    the mediastinum (the central eighth of the width) in a letterboxed PA chest X-ray."""
    image = canvas[box.top : box.top + box.height, box.left : box.left + box.width]
    h, w = image.shape
    middle = image[h // 3 : 2 * h // 3]
    lungs = np.concatenate([middle[:, w // 8 : 3 * w // 8].ravel(), middle[:, 5 * w // 8 : 7 * w // 8].ravel()])
    return float(lungs.mean()), float(middle[:, 7 * w // 16 : 9 * w // 16].mean())


def test_polarity_is_the_same_for_monochrome1_and_monochrome2(xrays):
    canvases = {}
    for name, (path, image) in xrays.items():
        ds = pydicom.dcmread(path)
        canvas, box = letterbox(image.pixels, 224)
        canvases[name] = canvas
        assert canvas.shape == (224, 224) and max(box.height, box.width) == 224
        lungs, mediastinum = _lungs_and_mediastinum(canvas, box)
        print(f"{name} {ds.PhotometricInterpretation}: lungs {lungs:.2f}, mediastinum {mediastinum:.2f}")
        assert lungs < mediastinum - 0.1, name  # lungs dark whatever the photometric interpretation
        # and against the stored values: MONOCHROME1 stores the lungs bright, so the input is inverted
        raw = ds.pixel_array.astype(np.float32)
        raw_canvas, _ = letterbox((raw - raw.min()) / (raw.max() - raw.min()), 224)
        inside = np.zeros((224, 224), bool)
        inside[box.top : box.top + box.height, box.left : box.left + box.width] = True
        r = np.corrcoef(raw_canvas[inside], canvas[inside])[0, 1]
        expected = -1 if ds.PhotometricInterpretation == "MONOCHROME1" else 1
        assert r * expected > 0.9, (name, r)
    assert np.array_equal(canvases["cr-mono1"], canvases["cr-mono1-j2k-lossless"])
    assert np.abs(canvases["cr-mono1"] - canvases["cr-mono1-j2k-lossy"]).mean() < 0.01


# --- the heatmap's geometry ---------------------------------------------------------------------------------


def test_heatmap_undoes_the_padding_and_the_resize():
    box = letterbox(np.zeros((100, 50), np.float32), 64)[1]  # the image on grid columns 1-2 of a 4 x 4 grid
    grid = np.zeros((4, 4))
    grid[0, 1] = 1.0  # the patch over the top-left quarter of the image
    heat = heatmap_to_image(grid, box)
    assert heat.shape == (100, 50) and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    assert np.unravel_index(np.argmax(heat), heat.shape) == (0, 0)
    assert (heat[:12, :12] == 1).all()  # up to the patch centre the value is flat (clamped, no padding mixed in)
    assert (heat[63:] == 0).all() and (heat[:, 37:] == 0).all()  # beyond the neighbouring patch centres
    padded = grid.copy()
    padded[:, [0, 3]] = 1e6  # padding patches never reach the image
    assert np.array_equal(heatmap_to_image(padded, box), heat)
    assert not heatmap_to_image(np.full((4, 4), 0.3), box).any()  # flat: nothing stands out
    with pytest.raises(ValueError, match="2-D"):
        heatmap_to_image(np.zeros(4), box)


def test_attention_rollout():
    # no attention between tokens: the class token only attends to itself, no patch gets anything
    assert not attention_rollout([torch.eye(5).expand(1, 2, 5, 5)] * 3, 1, (2, 2)).any()
    # uniform attention U over 5 tokens: (U + I) / 2 gives each patch 0.5 * 0.2; two blocks (U/2 + I/2)^2 =
    # 3U/4 + I/4 give 0.75 * 0.2
    uniform = torch.full((1, 2, 5, 5), 0.2)
    assert torch.allclose(attention_rollout([uniform], 1, (2, 2)), torch.full((1, 2, 2), 0.1))
    assert torch.allclose(attention_rollout([uniform] * 2, 1, (2, 2)), torch.full((1, 2, 2), 0.15))
    # the rollout a RolloutViT returns comes from its blocks' attention maps, with the logits of the plain ViT
    vit = create_model(tiny_config()).eval()
    model = RolloutViT(vit)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, rollout = model(x)
        assert torch.allclose(logits, vit(x), atol=1e-5) and rollout.shape == (1, 4, 4)
        assert (rollout >= 0).all() and float(rollout.sum()) <= 1.0 + 1e-5  # part of the class token's row


# --- runs on the shared X-rays ------------------------------------------------------------------------------


def _referenced_uids(ds: Dataset) -> set[str]:
    found, stack = set(), [ds]
    while stack:
        item = stack.pop()
        for element in item:
            if element.VR == "SQ":
                stack.extend(element.value)
            elif element.keyword == "ReferencedSOPInstanceUID":
                found.add(str(element.value))
    return found


@pytest.mark.parametrize("name", list(XRAYS))
def test_run_and_outputs_on_the_shared_xrays(plugin, xrays, name: str, tmp_path: Path):
    path, image = xrays[name]
    t = time.perf_counter()
    findings = plugin.run(image)
    seconds = time.perf_counter() - t
    print(f"{name} {image.pixels.shape}: {findings.summary} in {seconds:.3f} s (tiny ViT, CPU)")
    findings.validate(MANIFEST, image)
    assert findings.not_applicable is None and not findings.warnings
    (c,) = findings.classifications
    assert c.concept == PNEUMONIA and c.threshold == 0.5 and 0 <= c.probability <= 1
    label, p = SUMMARY.match(findings.summary).groups()[0], float(findings.summary[-5:-1])
    assert label == ("PNEUMONIA" if c.positive else "NORMAL")
    assert p == pytest.approx(c.probability if c.positive else 1 - c.probability, abs=0.006)
    (heat,) = findings.heatmaps
    assert heat.name == HEATMAP and heat.values.shape == image.pixels.shape
    assert heat.values.min() == 0.0 and heat.values.max() == 1.0

    source = pydicom.dcmread(path, stop_before_pixels=True)
    sources = read_sources(image, {str(source.SOPInstanceUID): path})
    written = write_outputs(findings, image, sources, Provenance(MANIFEST), str(source.SeriesInstanceUID),
                            tmp_path, meta={"plugin": MANIFEST.name})
    assert sorted(p.name for p in written) == ["SC-001.dcm", "SR.dcm", "arrays.npz", "findings.json"]
    for out in written:
        if out.suffix == ".dcm":
            ds = assert_valid(out)
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert str(source.SOPInstanceUID) in _referenced_uids(ds)
    sr = pydicom.dcmread(tmp_path / "SR.dcm")
    evidence = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID}
    assert PNEUMONIA.value in str(sr) and "threshold=0.5" in str(sr)
    document = json.loads((tmp_path / "findings.json").read_text())
    assert document["classifications"][0]["probability"] == c.probability


def test_other_images_are_not_applicable(plugin):
    ct = Image(kind="volume", pixels=np.zeros((12, 32, 32), np.float32), spacing=(1.0, 1.0, 1.0), modality="CT",
               sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(12)))
    assert "2-D X-ray" in plugin.run(ct).not_applicable
    us = Image(kind="frames", pixels=np.zeros((3, 32, 32), np.uint8), spacing=(1.0, 1.0), modality="US",
               sources=tuple(SourceRef("1.2.3", "1.2.840.10008.5.1.4.1.1.3.1", f) for f in (1, 2, 3)))
    assert "2-D X-ray" in plugin.run(us).not_applicable


def test_load_never_reaches_the_network(weights: Path, monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cxr-pneumonia tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert loaded(weights).net is not None


def test_runs_are_deterministic(plugin, weights: Path, xrays):
    _, image = xrays["cr-mono1-j2k-lossy"]
    first, second, fresh = plugin.run(image), plugin.run(image), loaded(weights).run(image)
    for other in (second, fresh):
        assert other.classifications == first.classifications and other.summary == first.summary
        assert np.array_equal(other.heatmaps[0].values, first.heatmaps[0].values)


def test_threshold_from_config(tmp_path: Path, plugin, xrays):
    _, image = xrays["sc-dx-mono2"]
    p = plugin.run(image).classifications[0].probability
    for threshold, positive in ((max(0.0, p - 0.01), True), (min(1.0, p + 0.01), False)):
        findings = loaded(write_models(tmp_path / str(threshold), threshold=threshold)).run(image)
        (c,) = findings.classifications
        assert (c.threshold, c.positive) == (threshold, positive)
        assert findings.summary.startswith("PNEUMONIA" if positive else "NORMAL")


# --- ONNX --------------------------------------------------------------------------------------------------


def test_onnx_export_and_backend_agree_with_torch(tmp_path: Path, plugin, weights: Path, xrays):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    t = time.perf_counter()
    report = plugin.export_onnx(folder / "model.onnx")
    print(f"export {time.perf_counter() - t:.2f} s: {report}")
    assert report["path"] == str(folder / "model.onnx") and report["max_abs_diff"] < 1e-4
    assert report["probability_max_abs_diff"] < 1e-5 and report["rollout_max_abs_diff"] < 1e-5
    shutil.copy(weights, folder / MANIFEST.weights)
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    onnx = loaded(folder / MANIFEST.weights)
    with pytest.raises(RuntimeError, match="torch backend"):
        onnx.export_onnx(tmp_path / "again.onnx")
    worst = {"probability": 0.0, "heatmap": 0.0}
    for name in ("cr-mono1-j2k-lossy", "sc-dx-mono2"):
        _, image = xrays[name]
        ref, got = plugin.run(image), onnx.run(image)
        got.validate(MANIFEST, image)
        worst["probability"] = max(worst["probability"], abs(got.classifications[0].probability
                                                             - ref.classifications[0].probability))
        worst["heatmap"] = max(worst["heatmap"], float(np.abs(got.heatmaps[0].values - ref.heatmaps[0].values).max()))
        assert got.summary == ref.summary and not got.warnings
    print(f"ONNX Runtime vs torch on the shared X-rays: max abs diff {worst}")
    assert worst["probability"] < 1e-4 and worst["heatmap"] < 1e-3
    # the batch axis is dynamic
    x, _ = preprocess(xrays["sc-dx-mono2"][1].pixels, tiny_config())
    single = OnnxModel(folder / "model.onnx", torch.device("cpu"))(x)[0]
    pair = OnnxModel(folder / "model.onnx", torch.device("cpu"))(np.concatenate([x, x]))[0]
    assert pair.shape == (2, 2) and np.allclose(pair, np.concatenate([single, single]), atol=1e-5)


def test_onnx_without_attention_output_runs_without_heatmap(tmp_path: Path, weights: Path, plugin, xrays):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    vit = plugin.net.vit
    export_onnx(vit, [torch.zeros(1, 3, 64, 64)], folder / "model.onnx", ["input"], ["logits"])
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    findings = loaded(folder / MANIFEST.weights).run(xrays["sc-dx-mono2"][1])
    assert not findings.heatmaps and findings.warnings == ["the ONNX model has no attention output: no heatmap"]
    ref = plugin.run(xrays["sc-dx-mono2"][1])
    assert findings.classifications[0].probability == pytest.approx(ref.classifications[0].probability, abs=1e-4)


def test_unusable_onnx_models_are_unavailable(tmp_path: Path, plugin):
    folder = tmp_path / MANIFEST.name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    with pytest.raises(WeightsUnavailable, match="not found"):
        loaded(folder / MANIFEST.weights)
    (folder / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(WeightsUnavailable, match="not a usable ONNX model"):
        loaded(folder / MANIFEST.weights)
    plugin.export_onnx(folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx", "img_size": 96}))
    with pytest.raises(WeightsUnavailable, match="does not take one 96 x 96 image"):
        loaded(folder / MANIFEST.weights)
    three = timm.create_model(MANIFEST.config["model_name"], pretrained=False, num_classes=3, img_size=64,
                              **TINY["model_kwargs"])
    export_onnx(three, [torch.zeros(1, 3, 64, 64)], folder / "model.onnx", ["input"], ["logits"])
    (folder / "config.json").write_text(json.dumps({**TINY, "backend": "onnx"}))
    with pytest.raises(WeightsUnavailable, match="3 outputs, the configuration names 2 classes"):
        loaded(folder / MANIFEST.weights)


def test_an_unloaded_plugin_fails_loudly(xrays):
    with pytest.raises(RuntimeError, match="not loaded"):
        build(MANIFEST).run(xrays["sc-dx-mono2"][1])
