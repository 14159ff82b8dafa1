"""cxr-foundation plugin: manifest, preprocessing and embeddings on the shared chest X-rays, findings written as
valid SR/SC, weights checks, head training on planted signals, the embeddings file, ONNX parity and backend.

A tiny ViT of the configured family (2 blocks, 32 dimensions, 56 px -> 4 x 4 patches) with generated weights
stands in for the 300M-parameter backbone; nothing here downloads weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from plugins.base import Image, SourceRef, WeightsUnavailable
from plugins.cxr_foundation import FINDINGS, IMAGENET_MEAN, IMAGENET_STD, MANIFEST
from plugins.cxr_foundation.embed import EmbeddingSet, embed_paths, load_embeddings, save_embeddings
from plugins.cxr_foundation.heads import (
    Heads,
    LabelsError,
    auroc,
    bootstrap_auroc,
    load_heads,
    read_labels,
    save_heads,
    stratified_split,
    train_heads,
    train_heads_file,
)
from plugins.cxr_foundation.model import CxrFoundation, build_backbone, preprocess, read_config
from plugins.registry import build, sha256_file
from plugins.torch_common import save_weights
from plugins.xray import Letterbox, grid_to_image
from tests.conftest import REPO
from tests.dicom_checks import assert_valid

TINY = {"model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "img_size": 56}
DIM, PATCHES, REGISTERS = 32, 16, 4
XRAYS = {  # name -> (file under the data root, PhotometricInterpretation, SOP class keyword)
    "cr_uncompressed": ("cxr_nema_wg04_rg1/RG1_UNCR.dcm", "MONOCHROME1", "ComputedRadiographyImageStorage"),
    "cr_j2k_lossless": ("cxr_nema_wg04_rg1/RG1_J2KR.dcm", "MONOCHROME1", "ComputedRadiographyImageStorage"),
    "cr_j2k_lossy": ("cxr_nema_wg04_rg1/RG1_J2KI.dcm", "MONOCHROME1", "ComputedRadiographyImageStorage"),
    "dx_secondary_capture": ("cxr_nih_google_dicom/nih_cxr_google_sc_dx.dcm", "MONOCHROME2",
                             "SecondaryCaptureImageStorage"),
}


def write_models(folder: Path, config: dict | None = None, thresholds: list[float] | None = None,
                 seed: int = 0) -> Path:
    """A models folder for the plugin: config.json, a generated tiny backbone and random heads. Returns the
    backbone path. By default the first finding's threshold is 0 (always positive), the others 1."""
    folder.mkdir(parents=True, exist_ok=True)
    merged = TINY | (config or {})
    (folder / "config.json").write_text(json.dumps(merged))
    weights = folder / "backbone.safetensors"
    cfg = read_config(MANIFEST, weights)
    torch.manual_seed(seed)
    save_weights(build_backbone(cfg), weights)
    heads = Heads(DIM, len(cfg.findings))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.5)
        heads.thresholds.copy_(torch.tensor(thresholds or [0.0] + [1.0] * (len(cfg.findings) - 1)))
    save_heads(folder / cfg.heads_file, heads.state_dict(), cfg.findings)
    return weights


def loaded(weights: Path, heads: bool = True) -> CxrFoundation:
    plugin = build(MANIFEST)
    assert isinstance(plugin, CxrFoundation)
    plugin.load("cpu", weights, heads=heads)
    return plugin


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_models(tmp_path_factory.mktemp("models") / MANIFEST.name)


@pytest.fixture(scope="module")
def plugin(weights: Path) -> CxrFoundation:
    return loaded(weights)


@pytest.fixture(scope="module")
def xray_paths(data_root: Path) -> dict[str, Path]:
    return {name: data_root / rel for name, (rel, _, _) in XRAYS.items()}


@pytest.fixture(scope="module")
def xrays(xray_paths: dict[str, Path]) -> dict[str, Image]:
    return {name: load_image([path]) for name, path in xray_paths.items()}


def denormalised(array: np.ndarray) -> np.ndarray:
    return np.stack([array[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)])


# --- manifest -------------------------------------------------------------------------------------------


def test_manifest_codes_config_and_light_import():
    assert MANIFEST.name == "cxr-foundation" and MANIFEST.version == "1.0.0"
    assert MANIFEST.modalities == ["CR", "DX"] and MANIFEST.outputs == ["SR", "SC"] and MANIFEST.queue == "gpu"
    assert MANIFEST.series.body_parts == ["CHEST"] and MANIFEST.weights == "backbone.safetensors"
    codes = {c.value: c.meaning for c in MANIFEST.findings}
    assert codes == {"233604007": "Pneumonia", "60046008": "Pleural effusion", "36118008": "Pneumothorax",
                     "8186001": "Cardiomegaly", "46621007": "Atelectasis", "786838002": "Nodule of lung",
                     "95436008": "Lung consolidation", "19242006": "Pulmonary edema"}
    assert all(c.scheme == "SCT" for c in MANIFEST.findings)
    config = MANIFEST.config
    assert config["model_name"] == "vit_large_patch14_reg4_dinov2" and config["img_size"] == 518
    assert (config["patch_size"], config["num_registers"], config["backend"]) == (14, 4, "auto")
    assert config["findings"] == list(FINDINGS) and config["heads_file"] == "heads.safetensors"
    assert read_config(MANIFEST, None).grid ** 2 == 1369
    code = ("import sys, plugins.cxr_foundation; bad = {'torch', 'timm'} & set(sys.modules); "
            "assert not bad, f'manifest imports {bad}'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# --- preprocessing --------------------------------------------------------------------------------------


def test_preprocess_letterboxes_and_normalises():
    portrait = np.tile(np.linspace(0.0, 1.0, 40, dtype=np.float32)[:, None], (1, 20))  # 40 x 20, bright below
    array, box = preprocess(portrait, 56, IMAGENET_MEAN, IMAGENET_STD)
    assert array.shape == (3, 56, 56) and array.dtype == np.float32
    assert box == Letterbox(shape=(40, 20), size=56, top=0, left=14, height=56, width=28)
    grey = denormalised(array)
    assert np.allclose(grey[0], grey[1], atol=1e-6) and np.allclose(grey[0], grey[2], atol=1e-6)
    assert np.allclose(grey[:, :, :14], 0.0, atol=1e-6) and np.allclose(grey[:, :, 42:], 0.0, atol=1e-6)
    content = grey[0, :, 14:42]
    assert content[0].mean() < 0.05 and content[-1].mean() > 0.95  # no flip, no inversion
    assert np.all(np.diff(content.mean(axis=1)) >= -1e-6)
    landscape, box = preprocess(np.full((10, 30), 2.0, np.float32), 56, IMAGENET_MEAN, IMAGENET_STD)
    assert (box.height, box.width, box.top, box.left) == (19, 56, 18, 0)
    assert np.allclose(denormalised(landscape)[0, 18:37], 1.0, atol=1e-6)  # clipped to [0, 1]
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((3, 10, 10), np.float32), 56, IMAGENET_MEAN, IMAGENET_STD)


def test_letterbox_maps_back_to_the_original_geometry():
    # a map that is the model-input column of each position must come back as the column each original pixel
    # was drawn at: the padding and the resize are undone
    _, box = preprocess(np.zeros((300, 150), np.float32), 56, IMAGENET_MEAN, IMAGENET_STD)
    grid = np.tile((np.arange(4) + 0.5) * 14.0, (4, 1))  # patch-centre column on the 56 px input
    back = grid_to_image(grid, box)
    assert back.shape == (300, 150)
    expected = box.left + (np.arange(150) + 0.5) * box.width / 150
    # only the patches overlapping the image are used: between their centres the map is exact
    inner = (expected >= 21.0) & (expected <= 35.0)
    assert inner.any() and np.allclose(back[150, inner], expected[inner], atol=0.6)


@pytest.mark.parametrize("name", list(XRAYS))
def test_preprocess_real_xrays(name: str, plugin: CxrFoundation, xrays: dict[str, Image],
                               xray_paths: dict[str, Path]):
    image = xrays[name]
    _, photometric, sop_class = XRAYS[name]
    ds = pydicom.dcmread(xray_paths[name], stop_before_pixels=True)
    assert ds.PhotometricInterpretation == photometric and ds.SOPClassUID.keyword == sop_class
    assert image.kind == "image2d"
    array, box = plugin.prepare(image)
    assert array.shape == (3, 56, 56)
    grey = denormalised(array)[0]
    height, width = image.pixels.shape
    if height > width:  # the portrait CR: padded left and right
        assert box.height == 56 and box.width < 56 and box.left > 0
        assert np.allclose(grey[:, :box.left], 0.0, atol=1e-6)
        assert np.allclose(grey[:, box.left + box.width:], 0.0, atol=1e-6)
    else:  # the square secondary capture: no padding
        assert (box.height, box.width, box.top, box.left) == (56, 56, 0, 0)
    # polarity: the mediastinum and spine (centre) are brighter than the lungs on both sides, whatever the
    # PhotometricInterpretation of the file (the loader inverts MONOCHROME1 once; preprocessing never does)
    content = grey[box.top:box.top + box.height, box.left:box.left + box.width]
    rows = content[int(0.35 * box.height):int(0.6 * box.height)]
    centre = rows[:, int(0.45 * box.width):int(0.55 * box.width)].mean()
    lungs = np.concatenate([rows[:, int(0.2 * box.width):int(0.35 * box.width)].ravel(),
                            rows[:, int(0.65 * box.width):int(0.8 * box.width)].ravel()]).mean()
    assert centre > lungs + 0.15, (centre, lungs)


def test_compressed_copies_preprocess_alike(plugin: CxrFoundation, xrays: dict[str, Image]):
    plain = plugin.prepare(xrays["cr_uncompressed"])[0]
    assert np.array_equal(plain, plugin.prepare(xrays["cr_j2k_lossless"])[0])
    lossy = plugin.prepare(xrays["cr_j2k_lossy"])[0]
    assert np.corrcoef(plain.ravel(), lossy.ravel())[0, 1] > 0.99


# --- embeddings and findings ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(XRAYS))
def test_embedding_shapes(name: str, plugin: CxrFoundation, xrays: dict[str, Image]):
    e = plugin.embed(xrays[name])
    for prefix in ("", "penultimate_"):
        assert e[f"{prefix}cls"].shape == (DIM,)
        assert e[f"{prefix}registers"].shape == (REGISTERS, DIM)
        assert e[f"{prefix}patches"].shape == (PATCHES, DIM)
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in e.values())
    assert not np.allclose(e["cls"], e["penultimate_cls"])


def test_batch_embeddings_equal_single(plugin: CxrFoundation, xrays: dict[str, Image]):
    images = [xrays["cr_uncompressed"], xrays["dx_secondary_capture"]]
    batch = plugin.embed_batch(np.stack([plugin.prepare(i)[0] for i in images]))
    for n, image in enumerate(images):
        single = plugin.embed(image)
        for key, value in single.items():
            assert np.allclose(batch[key][n], value, atol=1e-5), key


@pytest.mark.parametrize("name", list(XRAYS))
def test_findings_are_written_as_valid_dicom(name: str, plugin: CxrFoundation, xrays: dict[str, Image],
                                             xray_paths: dict[str, Path], tmp_path: Path):
    image = xrays[name]
    findings = plugin.run(image)
    assert findings.not_applicable is None
    findings.validate(MANIFEST, image)
    assert [c.concept for c in findings.classifications] == MANIFEST.findings
    assert all(0.0 <= c.probability <= 1.0 for c in findings.classifications)
    assert [c.positive for c in findings.classifications] == [True] + [False] * 7  # heads-file thresholds 0, 1
    (heat,) = findings.heatmaps
    assert heat.name == "Pneumonia" and heat.values.shape == image.pixels.shape
    assert heat.values.dtype == np.float32 and 0.0 <= heat.values.min() and heat.values.max() <= 1.0
    assert heat.values.std() > 0
    assert findings.summary.startswith("Above threshold: pneumonia")
    path = xray_paths[name]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sources = read_sources(image, {str(ds.SOPInstanceUID): path})
    written = write_outputs(findings, image, sources, Provenance(MANIFEST), str(ds.SeriesInstanceUID), tmp_path,
                            meta={})
    names = sorted(p.name for p in written)
    assert "SR.dcm" in names and "SC-001.dcm" in names
    for out in written:
        if out.suffix == ".dcm":
            assert_valid(out)
    sr = str(pydicom.dcmread(tmp_path / "SR.dcm"))
    assert all(c.value in sr for c in MANIFEST.findings)


def test_other_images_are_not_applicable(plugin: CxrFoundation):
    ct = Image(kind="volume", pixels=np.zeros((4, 32, 32), np.float32), spacing=(1.0, 1.0, 1.0), modality="CT",
               sources=tuple(SourceRef(f"1.2.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(4)))
    assert "2-D X-ray" in plugin.run(ct).not_applicable


def test_config_thresholds_override_the_heads_file(tmp_path: Path, xrays: dict[str, Image]):
    weights = write_models(tmp_path / "m", {"thresholds": {"pneumonia": 1.0, "cardiomegaly": 0.0}})
    findings = loaded(weights).run(xrays["dx_secondary_capture"])
    by_key = dict(zip(FINDINGS, findings.classifications, strict=True))
    assert by_key["pneumonia"].threshold == 1.0 and by_key["cardiomegaly"].threshold == 0.0
    assert by_key["pleural_effusion"].threshold == 1.0  # from the heads file
    assert [h.name for h in findings.heatmaps] == ["Cardiomegaly"]


# --- weights and configuration checks -------------------------------------------------------------------


def test_missing_or_mismatched_files_make_the_plugin_unavailable(tmp_path: Path, weights: Path):
    folder = tmp_path / "copy"
    shutil.copytree(weights.parent, folder)
    backbone, heads = folder / "backbone.safetensors", folder / "heads.safetensors"
    with pytest.raises(WeightsUnavailable, match="backbone weights .* not found"):
        loaded(folder / "absent.safetensors")
    heads.unlink()
    with pytest.raises(WeightsUnavailable, match="heads file .* not found"):
        loaded(backbone)
    assert loaded(backbone, heads=False).heads is None  # embedding needs no heads
    with pytest.raises(RuntimeError, match="without heads"):
        loaded(backbone, heads=False).run(Image(kind="image2d", pixels=np.zeros((8, 8), np.float32),
                                                spacing=(1.0, 1.0), sources=(SourceRef("1.2", "1.2.3"),),
                                                modality="DX"))
    save_heads(heads, Heads(DIM, 2).state_dict(), ["pneumonia", "cardiomegaly"])
    with pytest.raises(WeightsUnavailable, match='set "findings" in config.json'):
        loaded(backbone)
    save_heads(heads, Heads(DIM, 8).state_dict(), list(FINDINGS), {"backbone_sha256": "0" * 64})
    with pytest.raises(WeightsUnavailable, match="another backbone"):
        loaded(backbone)
    save_heads(heads, Heads(16, 8).state_dict(), list(FINDINGS))
    with pytest.raises(WeightsUnavailable, match="16-dimensional"):
        loaded(backbone)
    heads.write_bytes(b"not safetensors")
    with pytest.raises(WeightsUnavailable, match="not a safetensors file"):
        loaded(backbone)
    for bad, message in [({"img_size": 50}, "multiple of patch_size"), ({"findings": ["fracture"]}, "findings"),
                         ({"backend": "tensorrt"}, "backend"), ({"colour": 1}, "unknown key"),
                         ({"num_registers": 2}, "registers")]:
        (folder / "config.json").write_text(json.dumps(TINY | bad))
        with pytest.raises(WeightsUnavailable, match=message):
            loaded(backbone, heads=False)
    (folder / "config.json").write_text(json.dumps(TINY | {"model_kwargs": {"embed_dim": 48, "num_heads": 2}}))
    with pytest.raises(WeightsUnavailable, match="does not fit the configured architecture"):
        loaded(backbone, heads=False)


# --- heads: metrics, labels, training -------------------------------------------------------------------


def test_auroc_bootstrap_and_split():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auroc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc(np.array([1, 1]), np.array([0.1, 0.2]))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    scores = y + rng.normal(0, 1.0, 400)
    area = auroc(y, scores)
    lo, hi = bootstrap_auroc(y, scores, 1000, seed=1)
    assert lo < area < hi and 0.03 < hi - lo < 0.2
    assert bootstrap_auroc(y, scores, 1000, seed=1) == (lo, hi)
    train, val = stratified_split(np.array([1] * 10 + [0] * 40), 0.2, np.random.default_rng(0))
    assert len(val) == 10 and sum(1 for i in val if i < 10) == 2 and not set(train) & set(val)
    with pytest.raises(ValueError, match="at least 2"):
        stratified_split(np.array([1, 0, 0, 0]), 0.2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(np.array([1, 1, 0, 0]), 1.0, np.random.default_rng(0))


def test_read_labels(tmp_path: Path):
    path = tmp_path / "labels.csv"
    path.write_text("id,pleural_effusion,cardiomegaly\na,1,0\nb,,1\n\nc,0,\n")
    assert read_labels(path) == (["pleural_effusion", "cardiomegaly"],
                                 {"a": {"pleural_effusion": 1, "cardiomegaly": 0}, "b": {"cardiomegaly": 1},
                                  "c": {"pleural_effusion": 0}})
    for text, message in [("study,pneumonia\na,1\n", "first column must be `id`"), ("id\na\n", "named and unique"),
                          ("id,pneumonia\na,1\na,0\n", "line 3: id 'a' appears twice"),
                          ("id,pneumonia\na,-1\n", "line 2: pneumonia is '-1'"),
                          ("id,pneumonia\na,1,0\n", "line 2: 3 values"), ("id,pneumonia\n,1\n", "empty id"),
                          ("id,pneumonia\n", "no labelled studies")]:
        path.write_text(text)
        with pytest.raises(LabelsError, match=message):
            read_labels(path)
    with pytest.raises(LabelsError, match="No such file"):
        read_labels(tmp_path / "absent.csv")


def planted(n: int = 400, dim: int = DIM, seed: int = 0) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """Random embeddings with two findings planted along random directions (effusion in the patches,
    cardiomegaly in the class token); a fifth of the cardiomegaly labels unknown; 1 in 4 positive."""
    rng = np.random.default_rng(seed)
    cls, patch_mean = rng.normal(0, 1, (n, dim)), rng.normal(0, 1, (n, dim))
    effusion, cardiomegaly = rng.random(n) < 0.25, rng.random(n) < 0.25
    patch_mean += 1.5 * np.outer(effusion, rng.normal(0, 1, dim))
    cls += 1.5 * np.outer(cardiomegaly, rng.normal(0, 1, dim))
    ids = [f"s{i:04d}" for i in range(n)]
    labels = {i: {"pleural_effusion": int(e)} | ({} if k % 5 == 0 else {"cardiomegaly": int(c)})
              for k, (i, e, c) in enumerate(zip(ids, effusion, cardiomegaly, strict=True))}
    return {"cls": cls.astype(np.float32), "patch_mean": patch_mean.astype(np.float32)}, ids, labels


@pytest.mark.parametrize("hidden", [0, 8])
def test_train_heads_learns_a_planted_signal(hidden: int):
    embeddings, ids, labels = planted()
    labels["unembedded"] = {"pleural_effusion": 1}
    state, report = train_heads(embeddings, ids, labels, ["pleural_effusion", "cardiomegaly"], seed=3,
                                epochs=30, hidden=hidden)
    print(json.dumps(report["findings"], indent=1))
    assert report["labelled_without_embeddings"] == 1 and report["embeddings"] == 400
    for finding in ("pleural_effusion", "cardiomegaly"):
        r = report["findings"][finding]
        lo, hi = r["auroc_ci95"]
        assert r["auroc"] > 0.9 and 0.5 < lo <= r["auroc"] <= hi <= 1.0 and hi - lo < 0.25
        assert 2.0 < r["pos_weight"] < 4.5  # about 3 negatives per positive
        assert 0.0 <= r["threshold"] <= 1.0 and r["sensitivity"] > 0.6 and r["specificity"] > 0.6
        share = r["positives_val"] / r["n_val"], r["positives_train"] / r["n_train"]
        assert abs(share[0] - share[1]) < 0.02  # stratified
    assert report["findings"]["pleural_effusion"]["patch_auroc"] > 0.9  # planted in the patches
    assert report["findings"]["cardiomegaly"]["n_train"] + report["findings"]["cardiomegaly"]["n_val"] == 320
    key = "pooled.hidden.weight" if hidden else "pooled.weight"
    assert tuple(state[key].shape)[-1] == 2 * DIM and tuple(state["patch.weight"].shape) == (2, DIM)
    again, _ = train_heads(embeddings, ids, labels, ["pleural_effusion", "cardiomegaly"], seed=3, epochs=30,
                           hidden=hidden)
    assert all(torch.equal(state[k], again[k]) for k in state)  # deterministic for a seed


def test_train_heads_rejects_unusable_data():
    embeddings, ids, labels = planted(40)
    for findings, kwargs, message in [(["fracture"], {}, "unknown finding"), (["pneumonia"], {}, "no labelled"),
                                      (["pleural_effusion"], {"ids": ids[:-1]}, r"\(n, D\)")]:
        with pytest.raises(ValueError, match=message):
            train_heads(embeddings, kwargs.get("ids", ids), labels, findings)
    few = {i: {"pleural_effusion": int(n == 0)} for n, i in enumerate(ids)}
    with pytest.raises(ValueError, match="pleural_effusion: 1 positive"):
        train_heads(embeddings, ids, few, ["pleural_effusion"])


def test_trained_heads_file_loads_into_the_plugin(tmp_path: Path, xrays: dict[str, Image]):
    findings = ["pleural_effusion", "cardiomegaly"]
    weights = write_models(tmp_path / "models", {"findings": findings}, thresholds=[0.5, 0.5])
    plugin = loaded(weights, heads=False)
    embeddings, ids, labels = planted()
    meta = plugin.embedding_meta()
    assert meta["backbone_sha256"] == sha256_file(weights)
    arrays = embeddings | {"registers": np.zeros((len(ids), REGISTERS, DIM), np.float32)}
    save_embeddings(tmp_path / "emb.npz", EmbeddingSet(ids, arrays, meta))
    csv = tmp_path / "labels.csv"
    csv.write_text("id,pleural_effusion,cardiomegaly\n" + "".join(
        f"{i},{v['pleural_effusion']},{v.get('cardiomegaly', '')}\n" for i, v in labels.items()))
    report = train_heads_file(tmp_path / "emb.npz", csv, weights.parent / "heads.safetensors", epochs=20)
    assert report["findings"]["pleural_effusion"]["auroc"] > 0.9
    assert report["backbone_sha256"] == meta["backbone_sha256"]
    heads = load_heads(weights.parent / "heads.safetensors", DIM)
    assert heads.findings == findings and heads.meta["report"]["findings"]["cardiomegaly"]["auroc"] > 0.9
    thresholds = [report["findings"][f]["threshold"] for f in findings]
    assert np.allclose(heads.heads.thresholds.numpy(), thresholds, atol=1e-6)
    result = loaded(weights).run(xrays["dx_secondary_capture"])
    assert [c.concept for c in result.classifications] == [FINDINGS[f] for f in findings]
    assert [c.threshold for c in result.classifications] == pytest.approx(thresholds, abs=1e-6)
    result.validate(MANIFEST, xrays["dx_secondary_capture"])
    save_weights(build_backbone(read_config(MANIFEST, weights)), weights)  # another backbone: heads refused
    with pytest.raises(WeightsUnavailable, match="another backbone"):
        loaded(weights)


# --- embeddings file ------------------------------------------------------------------------------------


def test_embed_paths_and_the_embeddings_file(plugin: CxrFoundation, xray_paths: dict[str, Path], tmp_path: Path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    ct = Image(kind="volume", pixels=np.zeros((2, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0), modality="CT",
               sources=(SourceRef("1.2.1", "1.2.3"), SourceRef("1.2.2", "1.2.3")))
    items = [("cr", [xray_paths["cr_uncompressed"]]), ("broken", [broken]), ("ct", [Path("ct")]),
             ("sc", [xray_paths["dx_secondary_capture"]]), ("j2k", [xray_paths["cr_j2k_lossy"]])]
    calls: list[tuple[int, int]] = []

    def load(paths):
        return ct if paths == [Path("ct")] else load_image(paths)

    embedded = embed_paths(plugin, items, load, batch_size=2, progress=lambda d, t: calls.append((d, t)),
                           patches=True)
    assert embedded.ids == ["cr", "sc", "j2k"] and set(embedded.failed) == {"broken", "ct"}
    assert "ImageLoadError" in embedded.failed["broken"] and "2-D X-ray" in embedded.failed["ct"]
    assert calls == [(n, 5) for n in range(1, 6)]
    for prefix in ("", "penultimate_"):
        assert embedded.arrays[f"{prefix}cls"].shape == (3, DIM)
        assert embedded.arrays[f"{prefix}registers"].shape == (3, REGISTERS, DIM)
        assert embedded.arrays[f"{prefix}patch_mean"].shape == (3, DIM)
        assert embedded.arrays[f"{prefix}patches"].shape == (3, PATCHES, DIM)
        assert embedded.arrays[f"{prefix}patches"].dtype == np.float16
    single = plugin.embed(load_image([xray_paths["dx_secondary_capture"]]))
    assert np.allclose(embedded.arrays["cls"][1], single["cls"], atol=1e-5)
    assert np.allclose(embedded.arrays["patch_mean"][1], single["patches"].mean(axis=0), atol=1e-5)
    assert embedded.meta["backbone_sha256"] == plugin.backbone_sha256 and embedded.meta["img_size"] == 56

    path = save_embeddings(tmp_path / "embeddings.npz", embedded)
    back = load_embeddings(path)
    assert back.ids == embedded.ids and back.failed == embedded.failed and back.meta["model_name"] == \
        "vit_large_patch14_reg4_dinov2"
    assert set(back.arrays) == set(embedded.arrays)
    assert all(np.array_equal(back.arrays[k], v) for k, v in embedded.arrays.items())
    with pytest.raises(ValueError, match="unique"):
        embed_paths(plugin, [("a", []), ("a", [])], load)
    for bad in (broken, tmp_path / "one.npy"):
        if bad.suffix == ".npy":
            np.save(bad, np.zeros(3))
        with pytest.raises(ValueError, match="not an embeddings file"):
            load_embeddings(bad)


# --- ONNX -----------------------------------------------------------------------------------------------


def test_onnx_export_parity_and_backend(tmp_path: Path, xrays: dict[str, Image]):
    weights = write_models(tmp_path / "models", thresholds=[0.5] * 8)
    torch_plugin = loaded(weights)
    report = torch_plugin.export_onnx(weights.parent / "model.onnx")
    print(report)
    assert report["max_abs_diff"] < 1e-4 and report["path"] == str(weights.parent / "model.onnx")
    assert set(report["max_abs_diff_by_output"]) == {"tokens", "penultimate_tokens", "logits", "patch_logits"}
    (weights.parent / "config.json").write_text(json.dumps(TINY | {"backend": "onnx"}))
    weights.rename(weights.with_suffix(".moved"))  # model.onnx replaces the torch weights
    onnx_plugin = loaded(weights)
    assert onnx_plugin.backbone_sha256 == torch_plugin.backbone_sha256
    assert onnx_plugin.network is None and onnx_plugin.onnx is not None
    image = xrays["cr_uncompressed"]
    a, b = torch_plugin.run(image), onnx_plugin.run(image)
    assert [c.probability for c in a.classifications] == pytest.approx([c.probability for c in b.classifications],
                                                                       abs=1e-4)
    assert [h.name for h in a.heatmaps] == [h.name for h in b.heatmaps]
    for ha, hb in zip(a.heatmaps, b.heatmaps, strict=True):
        assert np.max(np.abs(ha.values - hb.values)) < 1e-3
    e_torch, e_onnx = torch_plugin.embed(image), loaded(weights, heads=False).embed(image)
    assert all(np.allclose(e_torch[k], e_onnx[k], atol=1e-4) for k in e_torch)
    with pytest.raises(RuntimeError, match="torch backend"):
        onnx_plugin.export_onnx(tmp_path / "again.onnx")
    save_heads(weights.parent / "heads.safetensors", Heads(DIM, 8).state_dict(), list(FINDINGS))
    with pytest.raises(WeightsUnavailable, match="another heads_sha256 than .* run `radnode export-onnx` again"):
        loaded(weights)
    assert loaded(weights, heads=False).heads is None  # embedding does not use the heads
    (weights.parent / "model.onnx").unlink()
    with pytest.raises(WeightsUnavailable, match="not found"):
        loaded(weights, heads=False)
