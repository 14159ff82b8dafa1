"""Plugin contract and registry: manifests, discovery errors, availability, the reference plugin."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from plugins.base import Code, Findings, Image, Manifest, Measurement, Segmentation, SourceRef, WeightsUnavailable
from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import PluginLoadError, build, discover, sha256_file, unavailable_reason, weights_path

FIXTURE_SITE = Path(__file__).parent / "fixtures" / "plugin_site"


@pytest.fixture
def test_plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURE_SITE))
    yield
    sys.modules.pop("radnode_testplugins", None)


def volume(hu: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> Image:
    return Image(kind="volume", pixels=hu.astype(np.float32), spacing=spacing, modality="CT",
                 sources=tuple(SourceRef(f"1.2.3.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(hu.shape[0])))


def test_manifest_is_validated():
    base = dict(name="x", version="1", factory="a.b:c", modalities=["ct"])
    assert Manifest(**base).modalities == ["CT"]
    for bad, message in [
        ({"name": "Bad Name"}, "lower-case"),
        ({"factory": "nocolon"}, "package.module:callable"),
        ({"api_version": 99}, "not supported"),
        ({"queue": "tpu"}, "gpu"),
        ({"weights": "../escape.bin"}, "relative"),
        ({"modalities": []}, "at least 1"),
        ({"colour": "blue"}, "Extra inputs"),
        ({"outputs": ["PDF"]}, "SR"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Manifest(**(base | bad))
    seg = {"label": "a", "category": {"value": "1", "scheme": "SCT", "meaning": "m"},
           "type": {"value": "2", "scheme": "SCT", "meaning": "n"}}
    with pytest.raises(ValidationError, match="unique"):
        Manifest(**base, segments=[seg, seg])


def test_discovery_reports_broken_plugins_without_failing(test_plugins_on_path):
    found = discover()
    assert {"reference-threshold", "test-raises", "test-slow"} <= set(found.manifests)
    assert "test-broken" not in found.manifests and "DOES_NOT_EXIST" in found.errors["test-broken"]
    assert "colour" in found.errors["test-bad-manifest"]


def test_availability_follows_the_weights_file(tmp_path: Path):
    path = weights_path(REFERENCE, tmp_path)
    assert path == tmp_path / "reference-threshold" / "threshold.safetensors"
    assert "model unavailable" in unavailable_reason(REFERENCE, tmp_path)
    write_weights(path, 300.0)
    assert unavailable_reason(REFERENCE, tmp_path) is None
    assert len(sha256_file(path)) == 64


def test_reference_plugin_segments_above_threshold(tmp_path: Path):
    plugin = build(REFERENCE)
    with pytest.raises(WeightsUnavailable):
        plugin.load("cpu", tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(WeightsUnavailable):
        plugin.load("cpu", bad)
    plugin.load("cpu", write_weights(tmp_path / "w.safetensors", 300.0))
    hu = np.full((10, 20, 20), -1000.0)
    hu[2:6, 5:15, 5:15] = 700.0  # 4*10*10 voxels of 2 mm^3 = 0.8 mL
    hu[8, 0, 0] = 900.0  # a single-voxel speck is removed
    image = volume(hu)
    findings = plugin.run(image)
    findings.validate(REFERENCE, image)
    [seg] = findings.segmentations
    assert seg.mask.sum() == 400 and not seg.mask[8, 0, 0]
    vol, mean = findings.measurements
    assert (vol.value, vol.unit, mean.value, mean.unit) == (0.8, "mL", 700.0, "[hnsf'U]")
    flat = Image(kind="image2d", pixels=np.zeros((4, 4), np.float32), spacing=(1.0, 1.0), modality="CR",
                 sources=(SourceRef("1.2", "1.2.3"),))
    assert "needs a CT volume" in plugin.run(flat).not_applicable


def test_findings_validation_catches_contract_breaks():
    image = volume(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="not declared"):
        Findings(segmentations=[Segmentation("nope", np.zeros((3, 4, 4), bool))]).validate(REFERENCE, image)
    with pytest.raises(ValueError, match="shape"):
        Findings(segmentations=[Segmentation("above-threshold", np.zeros((3, 4), bool))]).validate(REFERENCE, image)
    with pytest.raises(ValueError, match="finite"):
        Findings(measurements=[Measurement(Code(value="1", scheme="SCT", meaning="v"), float("nan"), "mL")]).validate(
            REFERENCE, image)
    from plugins.base import Classification, Heatmap

    with pytest.raises(ValueError, match="quantity and the unit"):
        Findings(heatmaps=[Heatmap("h", np.zeros((3, 4, 4)), unit="mL")]).validate(REFERENCE, image)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantity and the unit"):
        Findings(heatmaps=[Heatmap("h", np.zeros((3, 4, 4)), quantity=" ")]).validate(REFERENCE, image)
    with pytest.raises(ValueError, match="probability"):
        Classification(Code(value="1", scheme="SCT", meaning="v"), 1.5)


def test_build_errors_name_the_factory():
    broken = REFERENCE.model_copy(update={"factory": "plugins.reference_threshold.model:nope"})
    with pytest.raises(PluginLoadError, match="model:nope"):
        build(broken)
    not_a_plugin = REFERENCE.model_copy(update={"factory": "plugins.reference_threshold.model:write_weights"})
    with pytest.raises(PluginLoadError):
        build(not_a_plugin)
