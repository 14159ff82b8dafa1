"""`radnode infer`: offline runs on a folder, a zip and a single file, through the real CLI process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest

from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import weights_path
from tests.dicom_checks import assert_valid
from tests.synthetic import write_ct_series


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_weights(weights_path(REFERENCE, root), 300.0)
    return root


def infer(tmp_path: Path, models: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}
    env |= {"RADNODE_MODELS_DIR": str(models), "RADNODE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "node.cli", "infer", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_folder_of_the_shared_chest_ct(tmp_path: Path, models: Path, ct_dir: Path):
    out = tmp_path / "out"
    done = infer(tmp_path, models, str(ct_dir), "--plugin", "reference-threshold", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "encoded" in done.stdout and "Volume" in done.stdout and "[hnsf'U]" in done.stdout
    assert "reading headers" in done.stderr  # the progress bar
    names = sorted(p.name for p in out.iterdir())
    assert {"SEG.dcm", "SR.dcm", "SC-001.dcm", "findings.json", "arrays.npz"} <= set(names)
    for p in out.glob("*.dcm"):
        assert_valid(p)
    document = json.loads((out / "findings.json").read_text())
    assert document["plugin"] == "reference-threshold" and document["measurements"][0]["value"] > 50
    source_study = pydicom.dcmread(next(ct_dir.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    assert pydicom.dcmread(out / "SR.dcm").StudyInstanceUID == source_study
    header = pydicom.dcmread(next(ct_dir.glob("*.dcm")), stop_before_pixels=True)
    assert str(header.PatientID) not in done.stderr and str(header.StudyInstanceUID) not in done.stderr


def test_zip_with_two_series_and_junk(tmp_path: Path, models: Path):
    a = write_ct_series(tmp_path / "a", kind="chest", slices=12, size=64)
    b = write_ct_series(tmp_path / "b", kind="head", slices=10, size=64)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in [*a, *b]:
            z.write(f, f"{f.parent.name}/{f.name}")
        z.writestr("notes/readme.dat", b"not dicom at all")
    out = tmp_path / "out"
    done = infer(tmp_path, models, str(archive), "--plugin", "reference-threshold", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert [(r["files"], r["state"]) for r in runs] == [(12, "encoded"), (10, "encoded")]
    assert sorted(p.name for p in out.iterdir()) == ["series-01", "series-02"]
    assert all(Path(p).is_file() for r in runs for p in r["outputs"])
    assert runs[0]["findings"]["measurements"] and runs[0]["timings"]["infer"] >= 0


def test_single_file_the_plugin_does_not_take(tmp_path: Path, models: Path, data_root: Path):
    cr = data_root / "cxr_nema_wg04_rg1" / "RG1_UNCR.dcm"
    done = infer(tmp_path, models, str(cr), "--plugin", "reference-threshold", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert "not-applicable - modality CR not in CT" in done.stdout


def test_bad_input_and_plugins(tmp_path: Path, models: Path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.bin").write_bytes(b"\x00" * 300)
    args = ["--out", str(tmp_path / "o")]
    done = infer(tmp_path, models, str(junk), "--plugin", "reference-threshold", *args)
    assert done.returncode == 1 and "no DICOM files found (1 other file(s))" in done.stderr
    done = infer(tmp_path, models, str(tmp_path / "missing"), "--plugin", "reference-threshold", *args)
    assert done.returncode == 1 and "no such file or folder" in done.stderr
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    done = infer(tmp_path, models, str(bad_zip), "--plugin", "reference-threshold", *args)
    assert done.returncode == 1
    done = infer(tmp_path, models, str(junk), "--plugin", "no-such-plugin", *args)
    assert done.returncode == 2 and "not installed" in done.stderr
    done = infer(tmp_path, tmp_path / "empty-models", str(junk), "--plugin", "reference-threshold", *args)
    assert done.returncode == 2 and "unavailable" in done.stderr


def test_a_series_the_loader_refuses_fails_with_the_reason(tmp_path: Path, models: Path):
    files = write_ct_series(tmp_path / "s", kind="chest", slices=12, size=64)
    broken = files[3]
    ds = pydicom.dcmread(broken)
    del ds.PixelData
    ds.save_as(broken)
    for f in files:
        if f != broken:
            f.unlink()
    done = infer(tmp_path, models, str(tmp_path / "s"), "--plugin", "reference-threshold", "--out", str(tmp_path / "o"))
    assert done.returncode == 1 and "failed - image load" in done.stdout
