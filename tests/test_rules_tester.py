"""The rule tester: `radnode rules test PATH` and the dashboard's routing page for a stored study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom

from node.dicom.header import read_header
from tests.conftest import REPO
from tests.test_dashboard import add_job, login, node  # noqa: F401  (the dashboard's fixture)

OTHER_RULES = """
rules:
  - name: axial-chest
    when:
      Modality: CT
      ImageType: {contains: [ORIGINAL, AXIAL]}
      SliceThickness: {ge: 2.0}
    plugins: [lung-quant]
    queue: cpu.nightly
    priority: stat
    destinations: []
  - name: thin-slices
    when: {Modality: CT, SliceThickness: {le: 1.0}}
    plugins: [lung-quant]
"""


def rules_test(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RADNODE_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    env.pop("RADNODE_RULES_FILE", None)
    return subprocess.run([sys.executable, "-m", "node.cli", "rules", "test", *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=REPO)


def test_the_header_joins_multi_valued_attributes_with_backslashes(ct_dir: Path):
    """ImageType is multi-valued: the job table keeps ORIGINAL\\PRIMARY\\AXIAL (not a Python list's repr),
    so an ImageType condition can match a real series."""
    header = read_header(sorted(ct_dir.glob("*.dcm"))[0])
    assert header.image_type == "ORIGINAL\\PRIMARY\\AXIAL\\HELIX"


def test_rules_test_on_the_shared_ct_and_a_broken_file(ct_dir: Path, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    files = sorted(ct_dir.glob("*.dcm"))
    for f in files:
        (folder / f.name).symlink_to(f)
    (folder / "notes.txt").write_text("not DICOM")
    bad = pydicom.dcmread(files[0])
    bad.SOPInstanceUID = "1.2.3.abc"
    bad.save_as(folder / "bad-uid.dcm")

    r = rules_test(str(folder), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rules: 4 from the default rules" in out
    assert f"{len(files)} instance(s)" in out
    assert "BodyPart           CHEST" in out  # normalised from the descriptions: the file has no BodyPartExamined
    assert "ImageType          ORIGINAL\\PRIMARY\\AXIAL\\HELIX" in out
    assert "rule chest-ct-lungs: matches -> lung-quant, ct-chest-triage" in out
    assert "rule abdomen-ct-organs: no match: BodyPart is CHEST, wanted ABDOMEN" in out
    assert "CT pixel check for lung-quant, ct-chest-triage: air-filled lungs found" in out
    assert "would queue: lung-quant on cpu (routine, rule chest-ct-lungs) -> all destinations" in out
    assert "ct-chest-triage: its job would be skipped: model unavailable" in out  # no weights here
    assert "refused" in out and "bad-uid.dcm" in out and "SOPInstanceUID" in out
    data = tmp_path / "data"
    assert not data.exists() or not [p for p in data.rglob("*") if p.is_file()]  # it stored nothing


def test_rules_test_json_with_a_rules_file_and_calling_ae(ct_dir: Path, tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(OTHER_RULES)
    r = rules_test(str(ct_dir), "--rules", str(rules), "--calling-ae", "CT_SCANNER_1", "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    [series] = json.loads(r.stdout)["series"]
    assert series["attributes"]["CallingAE"] == "CT_SCANNER_1"
    assert series["attributes"]["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"]
    by_rule = {x["rule"]: x for x in series["rules"]}
    assert by_rule["axial-chest"]["matched"] and by_rule["axial-chest"]["plugins"] == ["lung-quant"]
    assert by_rule["thin-slices"] == {"rule": "thin-slices", "matched": False,
                                      "failed": ["SliceThickness is 5.0, wanted <= 1"], "plugins": [], "left_out": []}
    assert series["queued"] == [{"plugin": "lung-quant", "rule": "axial-chest", "queue": "cpu.nightly",
                                 "priority": "stat", "destinations": [], "hours": None, "urgent": None}]


def test_rules_test_refuses_bad_input_clearly(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    r = rules_test(str(empty), tmp_path=tmp_path)
    assert r.returncode == 1 and "no DICOM series found" in " ".join(r.stderr.split())
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text("rules:\n  - name: x\n    when: {Modality: CT}\n    plugins: [no-such-plugin]\n")
    r = rules_test(str(empty), "--rules", str(bad_rules), tmp_path=tmp_path)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "line 4" in err and "unknown plugin 'no-such-plugin'" in err


def test_the_dashboard_shows_the_routing_of_a_stored_study(node):  # noqa: F811
    job_id = add_job(node, description="CT CHEST <b>")
    r = node.client.get("/studies/1.2.826.0.1.3680043.8.498.4242/routing", follow_redirects=False)
    assert r.status_code == 303  # sign in first
    login(node)
    assert 'href="/studies/1.2.826.0.1.3680043.8.498.4242/routing"' in node.client.get(f"/jobs/{job_id}").text
    r = node.client.get("/studies/1.2.826.0.1.3680043.8.498.4242/routing")
    assert r.status_code == 200, r.text
    page = r.text
    assert "from the default rules" in page
    assert "CHEST" in page and "CT CHEST &lt;b&gt;" in page  # the study description, escaped
    assert "chest-ct-lungs" in page and "no match: SliceCount is 1, wanted &gt;= 10" in page
    assert "Would queue now" in page and "<p>nothing</p>" in page
    assert node.client.get("/studies/1.2.3.999/routing").status_code == 404
    assert node.client.get("/studies/not-a-uid/routing").status_code == 422


def test_rules_test_shows_the_study_level_rules(ct_dir: Path, tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("""
rules:
  - name: thinnest-chest
    level: study
    when: {Modality: CT, BodyPart: CHEST}
    select: thinnest
    plugins: [lung-quant]
  - name: needs-two
    level: study
    when: {Modality: CT}
    require: [{SeriesDescription: {regex: mediastin}}]
    plugins: [lung-quant]
""")
    r = rules_test(str(ct_dir), "--rules", str(rules), "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    [series] = out["series"]
    assert series["queued"] == []  # no series-level rule
    [study] = out["studies"]
    thinnest, needs = study["rules"]
    assert thinnest["matched"] and [c["series_uid"] for c in thinnest["chosen"]] == [series["series_uid"]]
    assert thinnest["chosen"][0]["queued"][0]["plugin"] == "lung-quant"
    assert not needs["matched"] and needs["missing"] == ["series with SeriesDescription /mediastin/"]
    text = rules_test(str(ct_dir), "--rules", str(rules), tmp_path=tmp_path).stdout
    assert "rule needs-two: no match: waiting for series with SeriesDescription /mediastin/" in text
    assert "rule thinnest-chest: would queue lung-quant on cpu (routine) for series" in text
