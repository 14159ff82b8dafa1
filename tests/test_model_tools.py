"""Model tools through the real CLI: `radnode evaluate` (metrics against a hand-computed confusion matrix),
`radnode models check` and `radnode export-onnx` refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.imaging import load_image
from node.pipeline.evaluate import EvaluateError, auroc, read_labels
from tests.test_pipeline import FIXTURE_SITE


def cli(tmp_path: Path, *args: str, models: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}
    env |= {"RADNODE_DATA_DIR": str(tmp_path / "data"), "RADNODE_MODELS_DIR": str(models or tmp_path / "models"),
            "COLUMNS": "400", "PYTHONPATH": os.pathsep.join([str(FIXTURE_SITE), env.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def cases(tmp_path: Path, data_root: Path) -> tuple[Path, dict[str, float]]:
    """Five X-ray cases (files, one a folder) and their mean brightness (test-bright's probability)."""
    root = tmp_path / "cases"
    root.mkdir()
    sources = {
        "uncr": data_root / "cxr_nema_wg04_rg1" / "RG1_UNCR.dcm",
        "j2ki": data_root / "cxr_nema_wg04_rg1" / "RG1_J2KI.dcm",
        "j2kr": data_root / "cxr_nema_wg04_rg1" / "RG1_J2KR.dcm",
        "nih": data_root / "cxr_nih_google_dicom" / "nih_cxr_google_sc_dx.dcm",
    }
    means = {}
    sources["nih2"] = sources["nih"]
    for case, src in sources.items():
        if case == "nih":
            (root / case).mkdir()
            shutil.copy(src, root / case / "image.dcm")
        else:
            shutil.copy(src, root / f"{case}.dcm")
        means[case] = float(load_image([src]).pixels.mean())
    return root, means


def test_evaluate_matches_a_hand_computed_confusion_matrix(tmp_path: Path, cases):
    root, means = cases
    # test-bright predicts PNEUMONIA when the mean brightness >= 0.73: the NEMA image (0.754) is positive,
    # the NIH one (0.715) negative. With these labels: uncr TP, j2ki FP, j2kr TP, nih TN, nih2 FN.
    assert min(means["uncr"], means["j2ki"], means["j2kr"]) >= 0.73 > means["nih"]
    labels = {"uncr": "1", "j2ki": "NORMAL", "j2kr": "PNEUMONIA", "nih": "0", "nih2": "true"}
    truth = {"uncr": 1, "j2ki": 0, "j2kr": 1, "nih": 0, "nih2": 1}
    csv = tmp_path / "labels.csv"
    csv.write_text("id,label\n" + "".join(f"{c},{v}\n" for c, v in labels.items()))
    done = cli(tmp_path, "evaluate", str(root), "--plugin", "test-bright", "--labels", str(csv), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["tp"], report["fp"], report["tn"], report["fn"]) == (2, 1, 1, 1)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["precision"] == pytest.approx(2 / 3) and report["recall"] == pytest.approx(2 / 3)
    assert report["f1"] == pytest.approx(2 / 3)
    pos = [means[c] for c in means if truth[c] == 1]
    neg = [means[c] for c in means if truth[c] == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert report["auroc"] == pytest.approx(wins / (len(pos) * len(neg)))
    assert {c["id"]: c["probability"] for c in report["cases"]} == pytest.approx(means, abs=1e-6)
    table = cli(tmp_path, "evaluate", str(root), "--plugin", "test-bright", "--labels", str(csv))
    assert table.returncode == 0 and "accuracy" in table.stdout and "0.600" in table.stdout


def test_evaluate_refuses_bad_labels(tmp_path: Path, cases):
    root, _ = cases
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\nuncr,maybe\n")
    done = cli(tmp_path, "evaluate", str(root), "--plugin", "test-bright", "--labels", str(bad))
    assert done.returncode == 1 and "line 2: label 'maybe'" in done.stderr
    missing = tmp_path / "missing.csv"
    missing.write_text("id,label\nnobody,1\n")
    done = cli(tmp_path, "evaluate", str(root), "--plugin", "test-bright", "--labels", str(missing))
    assert done.returncode == 1 and "not found under" in done.stderr


def test_label_parsing_and_auroc(tmp_path: Path):
    path = tmp_path / "l.csv"
    path.write_text("id,label,extra\na,1,x\nb,normal,\nc,PNEUMONIA,\nd,false,\n")
    assert read_labels(path, negative=["NORMAL"], positive=["PNEUMONIA"]) == {"a": 1, "b": 0, "c": 1, "d": 0}
    path.write_text("id,label\na,1\na,0\n")
    with pytest.raises(EvaluateError, match="line 3: id 'a' appears twice"):
        read_labels(path)
    path.write_text("case,truth\na,1\n")
    with pytest.raises(EvaluateError, match="columns id and label"):
        read_labels(path)
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert auroc([1, 1], [0.2, 0.3]) is None


def test_models_check_lists_expected_files(tmp_path: Path):
    from plugins.reference_threshold.model import write_weights

    models = tmp_path / "models"
    done = cli(tmp_path, "models", "check", "--json", models=models)
    assert done.returncode == 1  # the reference plugin's weights are missing
    rows = {r["plugin"]: r for r in json.loads(done.stdout)}
    ref = rows["reference-threshold"]
    assert ref["available"] is False and ref["files"][0]["role"] == "weights" and not ref["files"][0]["present"]
    assert rows["lung-quant"]["available"] is True and rows["lung-quant"]["files"] == []
    assert rows["test-broken"]["available"] is False and "DOES_NOT_EXIST" in rows["test-broken"]["error"]
    weights = write_weights(models / "reference-threshold" / "threshold.safetensors", 300.0)
    rows = {r["plugin"]: r for r in json.loads(cli(tmp_path, "models", "check", "--json", models=models).stdout)}
    f = rows["reference-threshold"]["files"][0]
    assert f["present"] and f["bytes"] == weights.stat().st_size and len(f["sha256"]) == 64
    (models / "lung-quant").mkdir()
    (models / "lung-quant" / "config.json").write_text('{"colour": "blue"}')
    rows = {r["plugin"]: r for r in json.loads(cli(tmp_path, "models", "check", "--json", models=models).stdout)}
    assert rows["lung-quant"]["available"] is False and "unknown key(s) colour" in rows["lung-quant"]["error"]
    text = cli(tmp_path, "models", "check", models=models).stdout
    assert "reference-threshold" in text and "sha256" in text and "unknown key(s) colour" in text


def test_export_onnx_refusals(tmp_path: Path):
    done = cli(tmp_path, "export-onnx", "no-such-plugin")
    assert done.returncode == 2 and "not installed" in done.stderr
    done = cli(tmp_path, "export-onnx", "lung-quant")
    assert done.returncode == 2 and "has no ONNX export" in done.stderr


def test_embed_and_train_head_need_the_capability(tmp_path: Path):
    """The CLI reaches a plugin's embedding and head training through capabilities on the plugin contract;
    a plugin without them is refused by name, before anything is read or written."""
    (tmp_path / "studies").mkdir()
    done = cli(tmp_path, "embed", str(tmp_path / "studies"), "--plugin", "lung-quant", "--out",
               str(tmp_path / "emb.npz"))
    assert done.returncode == 2 and "plugin lung-quant cannot embed" in done.stderr, done.stderr
    labels = tmp_path / "labels.csv"
    labels.write_text("id,x\na,1\n")
    done = cli(tmp_path, "train-head", "--plugin", "lung-quant", "--embeddings", str(tmp_path / "emb.npz"),
               "--labels", str(labels), "--out", str(tmp_path / "heads.safetensors"))
    assert done.returncode == 2 and "plugin lung-quant cannot train heads" in done.stderr, done.stderr
    assert not (tmp_path / "emb.npz").exists() and not (tmp_path / "heads.safetensors").exists()


def test_embed_then_train_head_through_the_cli(tmp_path: Path, cases):
    """The foundation-model workflow with a tiny generated backbone: embed a folder of studies, train heads
    on labels, and the heads file loads into the plugin."""
    from tests.test_cxr_foundation import loaded, write_models

    root, _ = cases
    models = tmp_path / "models"
    backbone = write_models(models / "cxr-foundation")
    (models / "cxr-foundation" / "heads.safetensors").unlink()  # embedding needs no heads
    (root / "junk.dcm").write_bytes(b"not dicom")
    done = cli(tmp_path, "embed", str(root), "--out", str(tmp_path / "emb.npz"), "--batch-size", "2", models=models)
    assert done.returncode == 0, done.stderr
    assert "embedded 5 stud(ies)" in done.stdout and "1 left out" in done.stdout and "junk" in done.stderr
    labels = tmp_path / "labels.csv"
    labels.write_text("id,pleural_effusion\nuncr,1\nj2ki,0\nj2kr,1\nnih,0\nnih2,1\n")
    out = models / "cxr-foundation" / "heads.safetensors"
    done = cli(tmp_path, "train-head", "--embeddings", str(tmp_path / "emb.npz"), "--labels", str(labels),
               "--out", str(out), "--val-fraction", "0.4", "--epochs", "5", "--json", models=models)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["findings"]) == {"pleural_effusion"}
    assert 0.0 <= report["findings"]["pleural_effusion"]["auroc"] <= 1.0
    # the heads file it wrote loads with the backbone it was trained on, once the config names its findings
    config = models / "cxr-foundation" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"findings": ["pleural_effusion"]}))
    plugin = loaded(backbone)
    assert [c.concept.meaning for c in plugin.run(load_image([next(root.glob("uncr.dcm"))])).classifications] == [
        "Pleural effusion"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,pleural_effusion\nuncr,2\n")
    done = cli(tmp_path, "train-head", "--embeddings", str(tmp_path / "emb.npz"), "--labels", str(bad),
               "--out", str(tmp_path / "h.safetensors"), models=models)
    assert done.returncode == 1 and "line 2" in done.stderr
