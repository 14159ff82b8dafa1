"""Backend "auto" (the default of the torch plugins): on a CPU the first load exports the torch weights to ONNX,
checks ONNX Runtime against torch and runs ONNX Runtime when they agree; the verdict is kept beside the weights
and redone when the weights or the configuration change; a failed check, an export that cannot be written and a
GPU keep torch. Real tiny networks (us-prostate-seg, cxr-pneumonia), real ONNX Runtime, loaded the way the
workers load them (`node.pipeline.inference.load_plugin`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from node.imaging import load_image
from node.pipeline.inference import load_plugin
from node.settings import Settings
from plugins.torch_common import AUTO_ONNX_FILE, AUTO_REPORT_FILE, TorchPlugin
from tests.result_cases import CXR_FILE, CXR_TINY, US_FILE, US_TINY

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _any_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which backend is faster depends on the machine and its load: the tests choose by parity alone, except
    the one that asks for a speed-up ONNX Runtime cannot reach."""
    monkeypatch.setattr(TorchPlugin, "onnx_min_speedup", 0.0)


def _us_models(root: Path, seed: int = 0, **config) -> Path:
    from plugins.torch_common import save_weights
    from plugins.us_prostate_seg import MANIFEST
    from plugins.us_prostate_seg.model import network

    folder = root / MANIFEST.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(US_TINY | config))
    torch.manual_seed(seed)
    save_weights(network(MANIFEST.config | US_TINY), folder / MANIFEST.weights)
    return root


def _load(models: Path, name: str = "us-prostate-seg", device: str = "cpu", backend: str | None = None):
    from plugins.registry import discover

    settings = Settings(data_dir=models.parent / "data", models_dir=models, device=device)
    plugin, sha = load_plugin(discover().manifests[name], settings, backend)
    assert isinstance(plugin, TorchPlugin)
    return plugin, sha


def test_first_cpu_load_exports_checks_and_runs_onnx_runtime(tmp_path: Path, data_root: Path,
                                                             caplog: pytest.LogCaptureFixture):
    models = _us_models(tmp_path / "models")
    folder = models / "us-prostate-seg"
    with caplog.at_level(logging.INFO):
        auto, sha = _load(models)
    verdict = json.loads((folder / AUTO_REPORT_FILE).read_text())
    assert auto.backend == "onnx" and auto.net is None and auto.onnx_file == folder / AUTO_ONNX_FILE
    assert verdict["passed"] and verdict["max_abs_diff"] <= verdict["tolerance"] == auto.onnx_tolerance
    assert verdict["torch_seconds"] > 0 and verdict["onnx_seconds"] > 0
    assert verdict["speedup"] == pytest.approx(verdict["torch_seconds"] / verdict["onnx_seconds"], rel=0.01)
    assert set(verdict["versions"]) == {"torch", "onnxruntime"}
    assert "exported to model.auto.onnx" in caplog.text and "runs on cpu with onnx" in caplog.text
    from plugins.registry import sha256_file

    assert sha == sha256_file(folder / "model.safetensors")  # jobs record the weights the ONNX model came from

    # the same results as torch on a real ultrasound
    by_torch, _ = _load(models, backend="torch")
    assert by_torch.backend == "torch"
    image = load_image([data_root / US_FILE])
    a, b = by_torch.run(image), auto.run(image)
    assert a.summary == b.summary
    for x, y in zip(a.heatmaps, b.heatmaps, strict=True):
        assert np.max(np.abs(x.values - y.values)) < 1e-4
    for x, y in zip(a.segmentations, b.segmentations, strict=True):
        assert np.count_nonzero(x.mask != y.mask) <= 0.001 * x.mask.size

    # `radnode models check` tells the administrator what runs on a CPU
    from tests.test_model_tools import cli

    done = cli(tmp_path, "models", "check", "--json", models=models)
    (row,) = [r for r in json.loads(done.stdout) if r["plugin"] == "us-prostate-seg"]
    assert row["cpu_backend"].startswith("ONNX Runtime (backend auto: parity passed"), row
    (other,) = [r for r in json.loads(done.stdout) if r["plugin"] == "cxr-pneumonia"]
    assert other["cpu_backend"].startswith("backend auto: not settled yet"), other

    # a second load (another worker) takes the kept export without exporting again
    stamp = (folder / AUTO_ONNX_FILE).stat().st_mtime_ns
    again, _ = _load(models)
    assert again.backend == "onnx" and (folder / AUTO_ONNX_FILE).stat().st_mtime_ns == stamp

    # new weights, or a configuration change, is another model: exported and checked again
    _us_models(tmp_path / "models", seed=1)
    renewed, _ = _load(models)
    assert renewed.backend == "onnx" and (folder / AUTO_ONNX_FILE).stat().st_mtime_ns != stamp
    assert json.loads((folder / AUTO_REPORT_FILE).read_text())["fingerprint"] != verdict["fingerprint"]
    stamp = (folder / AUTO_ONNX_FILE).stat().st_mtime_ns
    (folder / "config.json").write_text(json.dumps(US_TINY | {"size": 160}))
    resized, _ = _load(models)
    assert resized.backend == "onnx" and (folder / AUTO_ONNX_FILE).stat().st_mtime_ns != stamp
    assert resized.onnx is not None and resized.onnx.session.get_inputs()[0].shape[-1] == 160


def test_a_failed_parity_check_keeps_torch_and_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture):
    from plugins.us_prostate_seg.model import ProstateSegmenter

    models = _us_models(tmp_path / "models")
    folder = models / "us-prostate-seg"
    monkeypatch.setattr(ProstateSegmenter, "onnx_tolerance", -1.0)  # no difference, not even 0, is small enough
    with caplog.at_level(logging.WARNING):
        plugin, _ = _load(models)
    assert plugin.backend == "torch" and plugin.net is not None
    assert "keeps torch: ONNX Runtime differs from torch" in caplog.text
    verdict = json.loads((folder / AUTO_REPORT_FILE).read_text())
    assert verdict["passed"] is False and not (folder / AUTO_ONNX_FILE).exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ProstateSegmenter, "export_onnx", lambda *_: pytest.fail("exported again"))
    plugin, _ = _load(models)
    assert plugin.backend == "torch"
    from tests.test_model_tools import cli

    done = cli(tmp_path, "models", "check", models=models)
    assert "on a CPU: torch (backend auto: ONNX Runtime differed by" in done.stdout, done.stdout


def test_an_export_that_fails_keeps_torch_and_is_tried_again_next_load(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture):
    from plugins.us_prostate_seg.model import ProstateSegmenter

    models = _us_models(tmp_path / "models")
    folder = models / "us-prostate-seg"

    def fails(self, path: Path) -> dict:
        path.write_bytes(b"half an export")
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(ProstateSegmenter, "export_onnx", fails)
    with caplog.at_level(logging.WARNING):
        plugin, _ = _load(models)
    assert plugin.backend == "torch" and plugin.net is not None
    assert "keeps torch: the ONNX export failed (RuntimeError: Unsupported" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    monkeypatch.undo()
    monkeypatch.setattr(TorchPlugin, "onnx_min_speedup", 0.0)
    plugin, _ = _load(models)
    assert plugin.backend == "onnx"


def test_onnx_runtime_slower_than_torch_keeps_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture):
    from plugins.us_prostate_seg.model import ProstateSegmenter

    models = _us_models(tmp_path / "models")
    folder = models / "us-prostate-seg"
    monkeypatch.setattr(ProstateSegmenter, "onnx_min_speedup", 1e9)  # no machine runs it a billion times faster
    with caplog.at_level(logging.INFO):
        plugin, _ = _load(models)
    assert plugin.backend == "torch" and "keeps torch: ONNX Runtime is" in caplog.text
    verdict = json.loads((folder / AUTO_REPORT_FILE).read_text())
    assert verdict["passed"] is False and verdict["max_abs_diff"] <= verdict["tolerance"]
    assert 0 < verdict["speedup"] < 1e9 and not (folder / AUTO_ONNX_FILE).exists()
    from tests.test_model_tools import cli

    done = cli(tmp_path, "models", "check", models=models)
    assert "on a CPU: torch (backend auto: ONNX Runtime ran at" in done.stdout, done.stdout


def test_auto_keeps_torch_on_a_read_only_folder_and_the_explicit_backends_stay(tmp_path: Path,
                                                                                caplog: pytest.LogCaptureFixture):
    models = _us_models(tmp_path / "models")
    folder = models / "us-prostate-seg"
    if os.geteuid() == 0:  # root writes anyway: make the export's target a folder, so the rename fails
        (folder / AUTO_ONNX_FILE).mkdir()
    else:
        folder.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            plugin, _ = _load(models)
    finally:
        folder.chmod(0o755)
    assert plugin.backend == "torch" and "backend auto keeps torch" in caplog.text
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    if (folder / AUTO_ONNX_FILE).is_dir():
        (folder / AUTO_ONNX_FILE).rmdir()

    (folder / "config.json").write_text(json.dumps(US_TINY | {"backend": "torch"}))
    plugin, _ = _load(models)
    assert plugin.backend == "torch" and not (folder / AUTO_ONNX_FILE).exists()


def test_auto_on_a_gpu_device_setting_without_a_gpu_falls_back_to_the_cpu_and_onnx(tmp_path: Path,
                                                                                   data_root: Path):
    """A ViT with its attention-rollout output: cxr-pneumonia's auto export keeps the heatmap."""
    from plugins.cxr_pneumonia import MANIFEST
    from plugins.cxr_pneumonia.model import create_model, read_config
    from plugins.torch_common import save_weights

    folder = tmp_path / "models" / MANIFEST.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CXR_TINY))
    torch.manual_seed(0)
    save_weights(create_model(read_config({**MANIFEST.config, **CXR_TINY})), folder / MANIFEST.weights)
    plugin, _ = _load(tmp_path / "models", name=MANIFEST.name, device="cuda" if not torch.cuda.is_available()
                      else "cpu")
    assert plugin.backend == "onnx"
    by_torch, _ = _load(tmp_path / "models", name=MANIFEST.name, backend="torch")
    image = load_image([data_root / CXR_FILE])
    a, b = by_torch.run(image), plugin.run(image)
    assert abs(a.classifications[0].probability - b.classifications[0].probability) < 1e-4
    assert len(b.heatmaps) == 1 and np.max(np.abs(a.heatmaps[0].values - b.heatmaps[0].values)) < 1e-3
