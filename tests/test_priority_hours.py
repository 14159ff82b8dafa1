"""Priority from the rule, the called AE title and RequestedProcedurePriority; routing by called AE; a rule's
hours hold its jobs until the window opens (then the sweeper sends them)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.dicom.header import read_header
from node.dispatch.scu import send
from node.route.router import SeriesAttrs, match, urgency
from node.route.rules import Hours, RulesError, parse_rules
from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import weights_path
from tests.synthetic import write_ct_series
from tests.test_pipeline import Stack, embedded_stack
from tests.test_router import MANIFESTS

UTC = dt.UTC


def hours(text: str) -> Hours:
    return Hours.model_validate(text)


@pytest.mark.parametrize("text, inside, outside", [
    ("08:00-17:00", ["08:00", "12:30", "16:59:59"], ["17:00", "07:59:59", "23:00"]),
    ("22:00-06:00", ["22:00", "23:59:59", "00:00", "05:59"], ["06:00", "12:00", "21:59:59"]),
    ("00:00:30-00:01", ["00:00:30", "00:00:59"], ["00:00:29", "00:01"]),
])
def test_hours_contain_their_start_not_their_end_and_wrap_midnight(text, inside, outside):
    h = hours(text)
    assert all(h.contains(dt.time.fromisoformat(t)) for t in inside)
    assert not any(h.contains(dt.time.fromisoformat(t)) for t in outside)


def test_next_open_is_none_inside_and_the_next_start_outside():
    h = hours("22:00-06:00")
    local = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.datetime.now().astimezone().tzinfo)
    opens = h.next_open(local)
    assert opens is not None and opens.time() == dt.time(22, 0) and opens.date() == local.date()
    assert h.next_open(local.replace(hour=23)) is None and h.next_open(local.replace(hour=3)) is None
    after = hours("08:00-09:00").next_open(local)  # already past today's opening: tomorrow's
    assert after is not None and after.date() == local.date() + dt.timedelta(days=1) and after.hour == 8


@pytest.mark.parametrize("value, message", [
    ('"8-17"', "bad time '8'"),
    ('"08:00-08:00"', "start and end at the same time"),
    ('"25:00-06:00"', "bad time '25:00'"),
    ("17", 'hours must be "HH:MM-HH:MM"'),
])
def test_bad_hours_are_refused_with_the_line(value, message):
    text = f"rules:\n  - name: r\n    when: {{Modality: CT}}\n    plugins: [ct-any]\n    hours: {value}\n"
    with pytest.raises(RulesError) as err:
        parse_rules(text, MANIFESTS)
    assert "line 5" in str(err.value) and message in str(err.value)


def ct(**kw) -> SeriesAttrs:
    return SeriesAttrs(modality="CT", body_parts=frozenset({"CHEST"}), slice_count=100, **kw)


def test_urgency_by_called_ae_and_requested_priority():
    assert urgency(ct(called_ae="radnode_stat"), ["RADNODE_STAT"]) == "called AE radnode_stat"
    assert urgency(ct(called_ae="RADNODE"), ["RADNODE_STAT"]) is None
    assert urgency(ct(requested_priority="HIGH")) == "RequestedProcedurePriority HIGH"
    assert urgency(ct(requested_priority="ROUTINE")) is None
    rules = parse_rules("rules:\n  - name: r\n    when: {Modality: CT}\n    plugins: [ct-any]\n", MANIFESTS)
    [m] = match(ct(requested_priority="STAT"), rules, MANIFESTS).matches
    assert (m.priority, m.urgent) == ("stat", "RequestedProcedurePriority STAT")
    [m] = match(ct(), rules, MANIFESTS).matches
    assert (m.priority, m.urgent) == ("routine", None)


def test_rules_route_by_called_ae_and_requested_priority():
    rules = parse_rules(
        "rules:\n"
        "  - name: by-called\n    when: {CalledAE: RADNODE_CT}\n    plugins: [ct-any]\n    hours: '22:00-06:00'\n"
        "  - name: by-priority\n    when: {RequestedProcedurePriority: [STAT, HIGH]}\n    plugins: [ct-any]\n",
        MANIFESTS)
    [m] = match(ct(called_ae="RADNODE_CT"), rules, MANIFESTS).matches
    assert m.rule == "by-called" and str(m.hours) == "22:00:00-06:00:00"
    [m] = match(ct(requested_priority="HIGH"), rules, MANIFESTS).matches
    assert m.rule == "by-priority" and m.priority == "stat"
    decision = match(ct(called_ae="OTHER"), rules, MANIFESTS)
    assert not decision.matches and "rule by-called: CalledAE is OTHER, wanted RADNODE_CT" in decision.reasons


def test_the_header_reads_requested_priority_at_the_top_or_in_the_request_attributes(tmp_path: Path):
    [f] = write_ct_series(tmp_path / "a", slices=1, size=16)
    ds = pydicom.dcmread(f)
    ds.RequestedProcedurePriority = "stat"
    ds.save_as(f)
    assert read_header(f).requested_priority == "STAT"
    del ds.RequestedProcedurePriority
    item = Dataset()
    item.RequestedProcedurePriority = "HIGH"
    ds.RequestAttributesSequence = Sequence([item])
    ds.save_as(f)
    assert read_header(f).requested_priority == "HIGH"
    del ds.RequestAttributesSequence
    ds.save_as(f)
    assert read_header(f).requested_priority is None


@pytest.fixture
def stack(tmp_path: Path):
    with embedded_stack(tmp_path) as s:
        yield s


def test_called_ae_priority_and_hours_end_to_end(stack: Stack, tmp_path: Path):
    """Real C-STORE: a series sent to RADNODE_STAT gets a stat job; one from a research AE is held by its rule's
    hours until the window opens ~20 s later (local time), then runs; an ordinary one is routine."""
    write_weights(weights_path(REFERENCE, stack.models), 300.0)
    opens = (dt.datetime.now().astimezone() + dt.timedelta(seconds=20)).replace(microsecond=0)
    closes = opens + dt.timedelta(hours=2)
    window = f"{opens.time().isoformat()}-{closes.time().isoformat()}"
    node = stack.start(f"""
rules:
  - name: research-nights
    when: {{Modality: CT, CallingAE: RESEARCH}}
    plugins: [reference-threshold]
    hours: "{window}"
  - name: reference-ct
    when: {{Modality: CT}}
    plugins: [reference-threshold]
""", stable_seconds="1")
    sent = {}
    for name, called, calling in (("stat", "RADNODE_STAT", "CT1"), ("research", node.ae_title, "RESEARCH"),
                                  ("routine", node.ae_title, "CT1")):
        files = write_ct_series(tmp_path / name, kind="chest", slices=12, size=64)
        assert send(files, "127.0.0.1", node.port, called, calling).sent == 12
        sent[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    by_series = {v: k for k, v in sent.items()}

    def named(rows):
        return {by_series[r["series_uid"]]: r for r in rows}

    rows = named(stack.wait_jobs(lambda rows: len(rows) == 3 and sum(r["state"] == "encoded" for r in rows) == 2,
                                 timeout=120))
    held = rows["research"]
    assert held["state"] == "queued" and held["started_at"] is None, held
    assert dt.datetime.fromisoformat(held["not_before"]) == opens.astimezone(UTC)
    assert (rows["stat"]["priority"], rows["routine"]["priority"], held["priority"]) == ("stat", "routine", "routine")
    notes = {se["series_uid"]: se["route_note"] for st in node.studies() for se in st["series"]}
    assert "priority stat: called AE RADNODE_STAT" in notes[sent["stat"]]
    assert "held until" in notes[sent["research"]] and "rule hours" in notes[sent["research"]]
    assert "priority stat" not in notes[sent["routine"]]
    rows = named(stack.wait_jobs(lambda rows: all(r["state"] == "encoded" for r in rows), timeout=120))
    started = dt.datetime.fromisoformat(rows["research"]["started_at"])
    assert started >= opens.astimezone(UTC), (started, opens)
