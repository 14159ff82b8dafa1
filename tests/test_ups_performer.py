"""UPS task performer (IHE AIW-I): reading workitems, the completion and cancellation updates, the durable claim
record, and end to end: radnode's performer against radnode's own UPS-RS provider, a real Orthanc as the PACS
holding a synthetic CT, the test plugins of tests/fixtures/plugin_site doing the work."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
import requests
from pydantic import ValidationError
from pydicom import Dataset
from pydicom.uid import generate_uid

from db.jobs import NewJob, create_jobs
from db.models import JobState, utcnow
from db.performer import PerformedTask, TaskState, adopt_job, known_workitems, move, record_claim, take_series
from db.records import record_instance, series_id_of
from node.dicom.header import read_header
from node.ingest.ingest import to_record
from node.settings import Settings
from node.ups.performer import (
    INCOMPLETE,
    Location,
    cancel_requested,
    cancellation,
    completion,
    input_series,
    scheduled_for,
    workitem_code,
)
from tests.conftest import free_port
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series
from tests.test_pipeline import embedded_stack

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def workitem(plugin: str, study_uid: str, series_uid: str, *, url: str | None = None, ae: str | None = None,
             sops: list[str] = (), station: str | None = None) -> Dataset:
    """A SCHEDULED workitem as an AIW-I orchestrator creates it: the plugin's code, one input series (PS3.3
    Table 10-3b) and where to retrieve it."""
    ds = Dataset()
    ds.SOPClassUID = UPS_PUSH
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = f"AI: {plugin}"
    ds.WorklistLabel = "AI"
    ds.ScheduledProcedureStepStartDateTime = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    ds.InputReadinessState = "READY"
    ds.ScheduledWorkitemCodeSequence = [_code(plugin, "99RADNODE", plugin)]
    if station:
        ds.ScheduledStationNameCodeSequence = [_code(station, "99RADNODE", station)]
    item = Dataset()
    item.TypeOfInstances = "DICOM"
    item.StudyInstanceUID, item.SeriesInstanceUID = study_uid, series_uid
    refs = []
    for sop in sops:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT, sop
        refs.append(ref)
    item.ReferencedSOPSequence = refs
    if ae:
        retrieve = Dataset()
        retrieve.RetrieveAETitle = ae
        item.DICOMRetrievalSequence = [retrieve]
    if url:
        retrieve = Dataset()
        retrieve.RetrieveURL = url
        item.WADORSRetrievalSequence = [retrieve]
    ds.InputInformationSequence = [item]
    return ds


# --- reading workitems (pure) ---------------------------------------------------------------------------


def test_input_series_reads_the_standard_macro_and_the_series_sequence_form():
    ds = workitem("test-slow", "1.2.3", "1.2.3.4", url="http://pacs/dicom-web/studies/1.2.3/series/1.2.3.4",
                  ae="PACS", sops=["1.2.3.4.5"])
    [one] = input_series(ds)
    assert (one.study_uid, one.series_uid, one.sop_uids) == ("1.2.3", "1.2.3.4", ("1.2.3.4.5",))
    assert one.retrieve_aes == ("PACS",)
    assert one.retrieve_urls == ("http://pacs/dicom-web/studies/1.2.3/series/1.2.3.4",)
    # the form that lists the series in a Referenced Series Sequence, retrieve locations on the item
    item = Dataset()
    item.StudyInstanceUID, item.RetrieveAETitle = "1.2.3", "PACS2"
    series = [Dataset(), Dataset()]
    series[0].SeriesInstanceUID, series[1].SeriesInstanceUID = "1.2.3.7", "1.2.3.8"
    item.ReferencedSeriesSequence = series
    ds.InputInformationSequence = [item]
    assert [(s.series_uid, s.sop_uids, s.retrieve_aes) for s in input_series(ds)] == [
        ("1.2.3.7", (), ("PACS2",)), ("1.2.3.8", (), ("PACS2",))]


@pytest.mark.parametrize("change, message", [
    (lambda i: setattr(i, "StudyInstanceUID", "1.2.x"), "no valid Study Instance UID"),
    (lambda i: delattr(i, "SeriesInstanceUID"), "no Series Instance UID"),
    (lambda i: setattr(i.ReferencedSOPSequence[0], "ReferencedSOPInstanceUID", "abc"), "not valid"),
])
def test_input_series_refuses_bad_items(change, message):
    ds = workitem("test-slow", "1.2.3", "1.2.3.4", sops=["1.2.3.4.5"])
    change(ds.InputInformationSequence[0])
    with pytest.raises(ValueError, match=message):
        input_series(ds)


def test_input_series_of_two_studies_are_refused():
    ds = workitem("test-slow", "1.2.3", "1.2.3.4")
    other = workitem("test-slow", "1.2.9", "1.2.9.4").InputInformationSequence[0]
    ds.InputInformationSequence.append(other)
    with pytest.raises(ValueError, match="2 studies"):
        input_series(ds)


def test_workitem_code_station_and_cancel_request():
    ds = workitem("lung-quant", "1.2.3", "1.2.3.4", station="RADNODE")
    assert workitem_code(ds) == ("lung-quant", "lung-quant")
    ds.ScheduledWorkitemCodeSequence = [_code("lung-quant", "99OTHER", "x")]
    assert workitem_code(ds) is None  # another scheme: not a radnode plugin name
    assert (scheduled_for(ds, "RADNODE"), scheduled_for(ds, "OTHER")) == (True, False)
    del ds.ScheduledStationNameCodeSequence
    assert scheduled_for(ds, "RADNODE") is None
    assert cancel_requested(ds) is None
    progress = Dataset()
    progress.ProcedureStepCancellationDateTime = "20261203120000"
    progress.ReasonForCancellation = "ordered in error"
    ds.ProcedureStepProgressInformationSequence = [progress]
    assert cancel_requested(ds) == "ordered in error"


def test_completion_carries_the_final_state_attributes_and_where_the_results_are():
    objects = [{"kind": k, "study_uid": "1.2.3", "series_uid": f"1.2.3.{n}", "sop_class_uid": cls,
                "sop_instance_uid": f"1.2.3.{n}.1"}
               for n, (k, cls) in enumerate([("SR", "1.2.840.10008.5.1.4.1.1.88.34"),
                                             ("SEG", "1.2.840.10008.5.1.4.1.1.66.4")], 1)]
    locations = [Location(frozenset({"SR", "SEG", "SC"}), ae_title="PACS"),
                 Location(frozenset({"SR"}), wado_root="http://viewer/dicom-web")]
    started = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    ds = completion(objects, locations, station="RADNODE", plugin=("lung-quant", "lung-quant"), version="1.2",
                    started=started, ended=started.replace(minute=5))
    ds = Dataset.from_json(json.dumps(ds.to_json_dict()))  # what the provider receives
    [pps] = ds.UnifiedProcedureStepPerformedProcedureSequence
    assert pps.PerformedStationNameCodeSequence[0].CodeValue == "RADNODE"
    assert pps.PerformedWorkitemCodeSequence[0].CodeValue == "lung-quant"
    assert pps.PerformedWorkitemCodeSequence[0].CodingSchemeDesignator == "99RADNODE"
    assert (pps.PerformedProcedureStepStartDateTime, pps.PerformedProcedureStepEndDateTime) == (
        "20261203100000+0000", "20261203100500+0000")
    assert "ActualHumanPerformersSequence" not in pps
    assert [p.TextValue for p in pps.PerformedProcessingParametersSequence] == ["lung-quant", "1.2"]
    sr, seg = pps.OutputInformationSequence
    assert (sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.TypeOfInstances) == ("1.2.3", "1.2.3.1", "DICOM")
    assert sr.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.1.1"
    assert [r.RetrieveAETitle for r in sr.DICOMRetrievalSequence] == ["PACS"]
    assert sr.WADORSRetrievalSequence[0].RetrieveURL == "http://viewer/dicom-web/studies/1.2.3/series/1.2.3.1"
    assert "WADORSRetrievalSequence" not in seg  # that destination takes no SEG


def test_cancellation_carries_the_reason_text_and_code():
    ds = cancellation("job 3 failed (infer): RuntimeError", INCOMPLETE, datetime(2026, 12, 3, tzinfo=UTC))
    [item] = ds.ProcedureStepProgressInformationSequence
    assert item.ProcedureStepCancellationDateTime == "20261203000000+0000"
    assert item.ReasonForCancellation == "job 3 failed (infer): RuntimeError"
    assert item.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110523"


def test_settings_check_the_worklist_destinations(monkeypatch):
    for key in ("RADNODE_CONFIG", "RADNODE_DESTINATIONS", "RADNODE_UPS_WORKLIST"):
        monkeypatch.delenv(key, raising=False)
    pacs = {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "pacs", "port": 104}
    viewer = {"name": "viewer", "kind": "orthanc", "url": "http://viewer"}
    ok = Settings(destinations=[pacs, viewer], ups_worklist={"url": "http://ris/dicomweb", "retrieve_from": "pacs",
                                                             "destinations": ["viewer"]})
    assert ok.ups_worklist.poll_seconds == 10 and ok.ups_worklist.station_name is None
    with pytest.raises(ValidationError, match="unknown destination"):
        Settings(destinations=[pacs], ups_worklist={"url": "http://ris/dicomweb", "destinations": ["nowhere"]})
    with pytest.raises(ValidationError, match="kind dicom or dicomweb"):
        Settings(destinations=[pacs, viewer], ups_worklist={"url": "http://ris/dicomweb", "retrieve_from": "viewer"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Settings(ups_worklist={"url": "http://ris/dicomweb", "pol_seconds": 3})


# --- the durable record (SQLite and PostgreSQL) -----------------------------------------------------------


def _stored_series(sessionmaker, tmp_path: Path) -> tuple[int, str]:
    files = write_ct_series(tmp_path / "ct", slices=3, size=32)
    with sessionmaker.begin() as session:
        for f in files:
            record_instance(session, to_record(read_header(f), f.name, f.stat().st_size, None), utcnow())
    uid = read_header(files[0]).series_uid
    with sessionmaker() as session:
        return series_id_of(session, uid), uid


def test_a_workitem_is_recorded_once_and_moves_by_compare_and_set(sessionmaker):
    with sessionmaker() as session:
        first = record_claim(session, "http://ris/dicomweb", "1.2.3", "1.2.3.9", "test-slow")
        assert first is not None
    with sessionmaker() as session:  # recorded already: resumed, never claimed a second time
        assert record_claim(session, "http://ris/dicomweb", "1.2.3", "1.2.3.10", "test-slow") is None
    with sessionmaker() as session:
        assert known_workitems(session, "http://ris/dicomweb", ["1.2.3", "1.2.4"]) == {"1.2.3"}
        assert known_workitems(session, "http://other/dicomweb", ["1.2.3"]) == set()
    with sessionmaker.begin() as session:
        assert move(session, first, TaskState.CLAIMED, TaskState.RETRIEVING)
        assert not move(session, first, TaskState.CLAIMED, TaskState.RUNNING)  # no longer claimed
        assert move(session, first, TaskState.RETRIEVING, TaskState.CANCELED, reason="x")
    with sessionmaker() as session:
        task = session.get(PerformedTask, first)
        assert (task.state, task.transaction_uid, task.finished_at is not None) == ("canceled", "1.2.3.9", True)


def test_a_taken_series_is_not_routed_and_a_rule_job_is_adopted(sessionmaker, tmp_path: Path):
    from db.jobs import requeue
    from db.models import Job, Series

    series_id, _ = _stored_series(sessionmaker, tmp_path)
    now = utcnow()
    with sessionmaker.begin() as session:  # a rule made a job for the plugin before, results to "viewer" only
        [rule_job] = create_jobs(session, series_id, [NewJob("test-slow", "0.1", "chest", "cpu", "routine",
                                                             destinations=["viewer"])], now)
        session.get(Job, rule_job).state = JobState.DELIVERED
    with sessionmaker.begin() as session:
        take_series(session, series_id, "UPS workitem 1.2.3", now)
        job_id, run = adopt_job(session, series_id, NewJob("test-slow", "0.1", "ups:workitem", "cpu", "routine",
                                                           destinations=["pacs"]), now)
    with sessionmaker() as session:
        series, job = session.get(Series, series_id), session.get(Job, job_id)
        assert (series.state, series.route_note, series.instance_count) == ("routed", "UPS workitem 1.2.3", 3)
        assert series.study.state == "routed"
        # the same job, widened to our destination and run again (its results never went there)
        assert (job_id, run, job.state, job.destinations) == (rule_job, True, "queued", ["pacs", "viewer"])
    with sessionmaker.begin() as session:  # a queued job is adopted without a second task
        assert adopt_job(session, series_id, NewJob("test-slow", "0.1", "ups:workitem", "cpu", "routine",
                                                    destinations=["pacs"]), now) == (rule_job, False)
        session.get(Job, rule_job).state = JobState.FAILED
    with sessionmaker.begin() as session:  # a failed one runs again
        assert adopt_job(session, series_id, NewJob("test-slow", "0.1", "ups:workitem", "cpu", "routine",
                                                    destinations=["pacs"]), now) == (rule_job, True)
        assert not requeue(session, rule_job)  # queued already


# --- end to end: radnode's performer against radnode's provider ----------------------------------------------


class Worklist:
    """Plain HTTP to the provider (as an AIW-I orchestrator talks to it)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}

    def create(self, ds: Dataset) -> str:
        uid = generate_uid()
        r = requests.post(f"{self.url}/workitems", params={"workitem": uid}, data=json.dumps([ds.to_json_dict()]),
                          headers=self.headers | {"Content-Type": "application/dicom+json"}, timeout=30)
        assert r.status_code == 201, (r.status_code, r.text)
        return uid

    def get(self, uid: str) -> Dataset:
        r = requests.get(f"{self.url}/workitems/{uid}", headers=self.headers, timeout=30)
        assert r.status_code == 200, (r.status_code, r.text)
        answer = r.json()
        return Dataset.from_json(answer[0] if isinstance(answer, list) else answer)

    def wait(self, uid: str, states: set[str], timeout: float = 120) -> Dataset:
        deadline = time.monotonic() + timeout
        ds = None
        while time.monotonic() < deadline:
            ds = self.get(uid)
            if ds.ProcedureStepState in states:
                return ds
            time.sleep(0.3)
        raise AssertionError(f"workitem never reached {states}: {ds.ProcedureStepState if ds else None}")


@pytest.fixture
def performer_setup(tmp_path: Path) -> Iterator[tuple]:
    """Orthanc (the PACS: inputs are fetched from it, results sent to it) and a node whose performer follows the
    node's own worklist. Returns (stack, orthanc, worklist, start) where start(**env) (re)starts the node."""
    pytest.importorskip("node.api.ups", reason="radnode's UPS-RS provider (node/api/ups.py) is not there yet")
    dicom_port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port).start()
    token = "rn_test_ups_" + uuid.uuid4().hex
    tokens = json.dumps([{"name": "test", "sha256": hashlib.sha256(token.encode()).hexdigest()}])
    pacs = {"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc.dicom_port}
    url = f"http://127.0.0.1:{http_port}/dicomweb"
    worklist = {"url": url, "token": token, "poll_seconds": 0.5, "retrieve_from": "pacs", "destinations": ["pacs"]}
    try:
        with embedded_stack(tmp_path) as stack:
            def start(**env: str):
                return stack.start(None, env=env, dicom_port=str(dicom_port), http_port=str(http_port),
                                   api_tokens=tokens, destinations=json.dumps([pacs]),
                                   ups_worklist=json.dumps(worklist), rules_file=str(stack.rules("rules: []\n")))
            yield stack, orthanc, Worklist(url, token), start
    finally:
        orthanc.stop()


def _ct_in_pacs(orthanc: Orthanc, folder: Path) -> tuple[str, str, list[str]]:
    files = write_ct_series(folder, slices=12, size=64)
    orthanc.upload(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID), [f.stem for f in files]


def _task_rows(stack) -> list[PerformedTask]:
    with stack.maker() as session:
        return list(session.query(PerformedTask).order_by(PerformedTask.id))


@pytest.mark.slow
def test_workitem_is_claimed_performed_and_completed_with_the_results_in_the_pacs(performer_setup, tmp_path):
    stack, orthanc, worklist, start = performer_setup
    study_uid, series_uid, sops = _ct_in_pacs(orthanc, tmp_path / "ct")
    start()
    url = f"{orthanc.dicomweb_url}/studies/{study_uid}/series/{series_uid}"
    uid = worklist.create(workitem("test-slow", study_uid, series_uid, url=url, sops=sops))
    # a plugin radnode knows but cannot run here (no weights in this node's models folder)
    unavailable = worklist.create(workitem("ct-chest-triage", study_uid, series_uid, url=url, sops=sops))
    done = worklist.wait(uid, {"COMPLETED", "CANCELED"})
    assert done.ProcedureStepState == "COMPLETED", done
    [pps] = done.UnifiedProcedureStepPerformedProcedureSequence
    assert pps.PerformedWorkitemCodeSequence[0].CodeValue == "test-slow"
    assert pps.PerformedStationNameCodeSequence[0].CodeValue == "RADNODE"
    outputs = {r.ReferencedSOPInstanceUID: (o.SeriesInstanceUID, o.DICOMRetrievalSequence[0].RetrieveAETitle)
               for o in pps.OutputInformationSequence for r in o.ReferencedSOPSequence}
    assert outputs and {ae for _, ae in outputs.values()} == {ORTHANC_AE}
    in_pacs = {i["SOPInstanceUID"]: i["SeriesInstanceUID"] for i in orthanc.study_instances(study_uid)}
    assert {sop: series for sop, (series, _) in outputs.items()}.items() <= in_pacs.items()
    [job] = stack.node.api("GET", "/v1/jobs", token=worklist.token).json()
    assert (job["plugin"], job["rule"], job["state"], job["series_uid"]) == ("test-slow", "ups:workitem",
                                                                             "delivered", series_uid)
    assert {o["sop_instance_uid"] for o in job["objects"]} == set(outputs)
    [task] = _task_rows(stack)
    assert (task.state, task.workitem_uid, task.job_ids) == ("completed", uid, [job["id"]])
    # the series came in through the store, routed by the workitem, not by the rules
    [study] = stack.node.studies()
    [series] = study["series"]
    assert series["state"] == "routed" and f"UPS workitem {uid}" in series["route_note"]
    # a workitem naming a plugin that cannot run here is left to another performer
    assert worklist.get(unavailable).ProcedureStepState == "SCHEDULED"


@pytest.mark.slow
def test_a_failing_job_cancels_the_workitem_with_the_reason(performer_setup, tmp_path):
    stack, orthanc, worklist, start = performer_setup
    study_uid, series_uid, sops = _ct_in_pacs(orthanc, tmp_path / "ct")
    start()
    # an AE title radnode does not know: fetched from retrieve_from (C-GET); only the instances named
    uid = worklist.create(workitem("test-raises", study_uid, series_uid, ae="ELSEWHERE", sops=sops[:6]))
    done = worklist.wait(uid, {"COMPLETED", "CANCELED"})
    assert done.ProcedureStepState == "CANCELED", done
    [progress] = done.ProcedureStepProgressInformationSequence
    assert "synthetic failure in run" in progress.ReasonForCancellation
    assert progress.ProcedureStepCancellationDateTime
    [job] = stack.jobs()
    assert (job["state"], job["fail_stage"]) == ("failed", "infer")
    [study] = stack.node.studies()
    assert study["series"][0]["instances"] == 6  # only the instances the workitem named
    [task] = _task_rows(stack)
    assert task.state == "canceled" and "synthetic failure" in task.reason


@pytest.mark.slow
def test_a_node_killed_after_the_claim_resumes_the_workitem_without_claiming_it_again(performer_setup, tmp_path):
    stack, orthanc, worklist, start = performer_setup
    study_uid, series_uid, sops = _ct_in_pacs(orthanc, tmp_path / "ct")
    marker = tmp_path / "running"
    start(TESTPLUGIN_SLOW_SECONDS="60", TESTPLUGIN_SLOW_MARKER=str(marker))
    uid = worklist.create(workitem("test-slow", study_uid, series_uid, ae=ORTHANC_AE, sops=sops))
    worklist.wait(uid, {"IN PROGRESS"})
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), stack.node.logs()[-3000:]
    [before] = _task_rows(stack)
    assert before.state == TaskState.RUNNING
    stack.node.kill9()
    start(TESTPLUGIN_SLOW_SECONDS="0")
    done = worklist.wait(uid, {"COMPLETED", "CANCELED"})
    assert done.ProcedureStepState == "COMPLETED", done
    [after] = _task_rows(stack)
    assert (after.id, after.transaction_uid, after.claimed_at, after.state) == (
        before.id, before.transaction_uid, before.claimed_at, "completed")
    assert "claimed: plugin" not in stack.node.logs()  # the restarted node resumed; it sent no second claim
    [job] = stack.jobs()
    assert job["state"] == "delivered" and job["attempts"] == 2
    srs = [i for i in orthanc.study_instances(study_uid) if i["Modality"] == "SR"]
    assert len(srs) == 1  # the rerun's results have the same UIDs: no duplicate in the PACS
    assert pydicom.dcmread(io.BytesIO(orthanc.file(srs[0]["id"])), stop_before_pixels=True).SOPInstanceUID


@pytest.mark.slow
def test_a_cancel_request_cancels_the_running_workitem(performer_setup, tmp_path):
    stack, orthanc, worklist, start = performer_setup
    study_uid, series_uid, sops = _ct_in_pacs(orthanc, tmp_path / "ct")
    marker = tmp_path / "running"
    start(TESTPLUGIN_SLOW_SECONDS="8", TESTPLUGIN_SLOW_MARKER=str(marker))
    uid = worklist.create(workitem("test-slow", study_uid, series_uid, ae=ORTHANC_AE, sops=sops))
    worklist.wait(uid, {"IN PROGRESS"})
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    request = Dataset()
    request.ReasonForCancellation = "ordered in error"
    r = requests.post(f"{worklist.url}/workitems/{uid}/cancelrequest", data=json.dumps([request.to_json_dict()]),
                      headers=worklist.headers | {"Content-Type": "application/dicom+json"}, timeout=30)
    assert r.status_code in (200, 202), (r.status_code, r.text)
    done = worklist.wait(uid, {"COMPLETED", "CANCELED"})
    assert done.ProcedureStepState == "CANCELED"
    reasons = [p.get("ReasonForCancellation") for p in done.ProcedureStepProgressInformationSequence]
    assert any("cancellation requested: ordered in error" in (r or "") for r in reasons), reasons
    [task] = _task_rows(stack)
    assert task.state == "canceled" and "ordered in error" in task.reason


@pytest.mark.slow
def test_a_claim_whose_answer_was_lost_is_sent_again_and_never_takes_another_performers_workitem(
        performer_setup, tmp_path):
    from db.migrate import upgrade

    stack, orthanc, worklist, start = performer_setup
    study_uid, series_uid, sops = _ct_in_pacs(orthanc, tmp_path / "ct")
    start(RADNODE_UPS_WORKLIST="null")  # the provider only, no performer yet
    ours = worklist.create(workitem("test-slow", study_uid, series_uid, ae=ORTHANC_AE, sops=sops))
    theirs = worklist.create(workitem("test-slow", study_uid, series_uid, ae=ORTHANC_AE, sops=sops))
    other_txn = generate_uid()
    claim = Dataset()
    claim.ProcedureStepState, claim.TransactionUID = "IN PROGRESS", other_txn
    r = requests.put(f"{worklist.url}/workitems/{theirs}/state", data=json.dumps([claim.to_json_dict()]),
                     headers=worklist.headers | {"Content-Type": "application/dicom+json"}, timeout=30)
    assert r.status_code == 200, r.text
    stack.node.stop()
    # radnode recorded both claims and stopped before either answer came (claimed_at unset)
    upgrade(stack.engine)
    txns = {ours: generate_uid(), theirs: generate_uid()}
    for uid, txn in txns.items():
        with stack.maker() as session:
            assert record_claim(session, worklist.url, uid, txn, "test-slow") is not None
    start()
    done = worklist.wait(ours, {"COMPLETED", "CANCELED"})
    assert done.ProcedureStepState == "COMPLETED"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and {t.state for t in _task_rows(stack)} != {"completed", "failed"}:
        time.sleep(0.3)
    mine, other = _task_rows(stack)
    assert (mine.workitem_uid, mine.state, mine.transaction_uid) == (ours, "completed", txns[ours])
    assert mine.claimed_at is not None
    assert (other.workitem_uid, other.state) == (theirs, "failed") and "another performer" in other.reason
    # their workitem is untouched: still theirs, with their Transaction UID
    assert worklist.get(theirs).ProcedureStepState == "IN PROGRESS"
    progress = Dataset()
    progress.ProcedureStepProgressInformationSequence = [Dataset()]
    progress.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress = 50
    r = requests.post(f"{worklist.url}/workitems/{theirs}?{other_txn}", data=json.dumps([progress.to_json_dict()]),
                      headers=worklist.headers | {"Content-Type": "application/dicom+json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(stack.jobs()) == 1
