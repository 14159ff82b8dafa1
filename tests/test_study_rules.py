"""Study-level rules: applied once the study is complete, with a series selection (all, thinnest, largest,
first) and required series; end to end, two series arriving seconds apart are routed once, together."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from node.dispatch.scu import send
from node.route.router import explain_study, match
from node.route.rules import RulesError, parse_rules
from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import weights_path
from tests.synthetic import write_ct_series
from tests.test_pipeline import Stack, embedded_stack
from tests.test_router import MANIFESTS, chest_ct

STUDY_RULE = """
rules:
  - name: chest-study
    level: study
    when: {Modality: CT}
    select: %s
    plugins: [ct-any]
"""


def study() -> dict[int, object]:
    return {
        1: chest_ct(series_description="Thorax 5.0 soft", slice_thickness=5.0, slice_count=60, series_number=3),
        2: chest_ct(series_description="Thorax 1.0 lung", slice_thickness=1.0, slice_count=300, series_number=4),
        3: chest_ct(series_description="Thorax 1.0 soft", slice_thickness=1.0, slice_count=310, series_number=2),
        4: chest_ct(modality="CR", series_description="Scout", slice_thickness=None, slice_count=1),
    }


@pytest.mark.parametrize("how, chosen", [("all", [1, 2, 3]), ("thinnest", [3]), ("largest", [3]),
                                         ("first", [3])])
def test_selection(how, chosen):
    rules = parse_rules(STUDY_RULE % how, MANIFESTS)
    [check] = explain_study(study(), rules, MANIFESTS)
    assert check.candidates == (1, 2, 3)  # the CR scout does not match `when`
    assert [sid for sid, _ in check.chosen] == chosen
    assert all(m.plugin == "ct-any" and m.rule == "chest-study" for _, ms in check.chosen for m in ms)


def test_required_series_must_all_be_present():
    text = STUDY_RULE % "all" + "    require:\n      - {SeriesDescription: {regex: lung}}\n" \
                                "      - {SeriesDescription: {regex: mediastin}}\n"
    rules = parse_rules(text, MANIFESTS)
    [check] = explain_study(study(), rules, MANIFESTS)
    assert not check.matched and check.missing == ("series with SeriesDescription /mediastin/",)
    partial = {k: v for k, v in study().items() if k != 2}
    [check] = explain_study(partial, parse_rules(STUDY_RULE % "all" + "    require: [{SeriesDescription: "
                                                 "{regex: lung}}]\n", MANIFESTS), MANIFESTS)
    assert check.missing == ("series with SeriesDescription /lung/",)


def test_a_series_alone_ignores_study_level_rules_and_says_so():
    decision = match(chest_ct(), parse_rules(STUDY_RULE % "all", MANIFESTS), MANIFESTS)
    assert decision.matches == ()
    assert decision.reasons[0].startswith("no series-level rule matched (study-level rules apply")


@pytest.mark.parametrize("extra, message", [
    ("    select: thinnest\n", "select needs `level: study`"),
    ("    require: [{Modality: CT}]\n", "require needs `level: study`"),
])
def test_study_keys_need_the_study_level(extra, message):
    text = "rules:\n  - name: r\n    when: {Modality: CT}\n    plugins: [ct-any]\n" + extra
    with pytest.raises(RulesError) as err:
        parse_rules(text, MANIFESTS)
    assert "line 5" in str(err.value) and message in str(err.value)


@pytest.fixture
def stack(tmp_path: Path):
    with embedded_stack(tmp_path) as s:
        write_weights(weights_path(REFERENCE, s.models), 300.0)
        yield s


@pytest.mark.slow
def test_two_series_seconds_apart_are_routed_once_together(stack: Stack, tmp_path: Path):
    node = stack.start("""
rules:
  - name: chest-pair
    level: study
    when: {Modality: CT}
    require:
      - {SeriesDescription: {regex: lung}}
      - {SeriesDescription: {regex: soft}}
    plugins: [reference-threshold]
""", stable_seconds="2")
    lung = write_ct_series(tmp_path / "lung", slices=12, size=64, series_description="Chest lung", series_number=3)
    study_uid = str(pydicom.dcmread(lung[0], stop_before_pixels=True).StudyInstanceUID)
    soft = write_ct_series(tmp_path / "soft", slices=12, size=64, series_description="Chest soft", series_number=4,
                           study_uid=study_uid)
    assert send(lung, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
    deadline = time.monotonic() + 60
    while not (studies := node.studies()) or studies[0]["state"] != "routed":
        assert time.monotonic() < deadline, studies
        time.sleep(0.3)
    assert "waiting for series with SeriesDescription /soft/" in studies[0]["route_note"]
    assert stack.jobs() == []  # the study is incomplete by the rule: nothing runs yet
    time.sleep(3)  # the second series comes later (a scanner reconstructing it)
    assert send(soft, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
    rows = stack.wait_jobs(lambda rows: len(rows) == 2 and all(r["state"] == "encoded" for r in rows), timeout=120)
    assert {r["series_uid"] for r in rows} == {str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID)
                                                for f in (lung, soft)}
    assert all(r["rule"] == "chest-pair" and r["attempts"] == 1 and r["revision"] == 0 for r in rows)
    [st] = node.studies()
    assert st["state"] == "routed" and st["reopened_count"] == 1
    assert "jobs: reference-threshold on series #3 (rule chest-pair), reference-threshold on series #4" \
           in st["route_note"]
    time.sleep(3)  # nothing runs twice
    assert len(stack.jobs()) == 2 and all(r["attempts"] == 1 for r in stack.jobs())


def test_a_plugin_taking_several_series_runs_once_on_the_chosen_ones():
    from plugins.base import Manifest, SeriesSelection

    pair = Manifest(name="pair", version="1", factory="x:y", modalities=["CT"],
                    series=SeriesSelection(multiple=True))
    manifests = {**MANIFESTS, "pair": pair}
    rules = parse_rules(STUDY_RULE.replace("[ct-any]", "[pair, ct-any]") % "all", manifests)
    [check] = explain_study(study(), rules, manifests)
    by_series = {sid: [(m.plugin, m.with_series) for m in ms] for sid, ms in check.chosen}
    assert by_series == {1: [("pair", (2, 3)), ("ct-any", ())], 2: [("ct-any", ())], 3: [("ct-any", ())]}
    with pytest.raises(RulesError) as err:  # a series-level rule sees one series: not for such a plugin
        parse_rules("rules:\n  - name: r\n    when: {Modality: CT}\n    plugins: [pair]\n", manifests)
    assert "takes several series at once" in str(err.value) and "line 4" in str(err.value)


@pytest.mark.slow
def test_two_series_go_to_one_multi_series_job(stack: Stack, tmp_path: Path):
    node = stack.start("""
rules:
  - name: pair
    level: study
    when: {Modality: CT}
    require: [{SeriesDescription: {regex: lung}}, {SeriesDescription: {regex: soft}}]
    plugins: [test-pair]
""", stable_seconds="2")
    lung = write_ct_series(tmp_path / "lung", slices=12, size=64, series_description="Chest lung", series_number=3)
    study_uid = str(pydicom.dcmread(lung[0], stop_before_pixels=True).StudyInstanceUID)
    soft = write_ct_series(tmp_path / "soft", slices=10, size=64, series_description="Chest soft", series_number=4,
                           study_uid=study_uid)
    assert send(lung + soft, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 22
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"encoded", "failed", "skipped"},
                            timeout=120)
    assert job["state"] == "encoded", job
    soft_uid = str(pydicom.dcmread(soft[0], stop_before_pixels=True).SeriesInstanceUID)
    assert job["extra_series"] == [soft_uid]
    measured = {m["concept"]["value"]: m["value"] for m in job["findings"]["measurements"]}
    assert measured == {"SERIESSEEN": 2.0, "SLICESSEEN": 22.0}
    assert "test-pair on series #3, #4 (rule pair)" in node.studies()[0]["route_note"]
    assert len(stack.jobs()) == 1
