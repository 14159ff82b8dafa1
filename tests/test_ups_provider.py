"""radnode as a UPS worklist provider (IHE AIW-I): UPS-RS over plain HTTP and DIMSE UPS Push/Pull with a
pynetdicom SCU, against a real `radnode run` — one node per database (SQLite, PostgreSQL), many checks each."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import UnifiedProcedureStepPull as PULL
from pynetdicom.sop_class import UnifiedProcedureStepPush as PUSH

from tests.conftest import HEAD_REVISION, NodeProcess, _pg_available, create_pg_database, drop_pg_database, need

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
DICOM_JSON = "application/dicom+json"
STATE, TXN = "00741000", "00081195"  # ProcedureStepState, TransactionUID


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def node(request, tmp_path_factory) -> Iterator[NodeProcess]:
    """One live node per database kind for the whole module."""
    tmp = tmp_path_factory.mktemp(f"ups-{request.param}")
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'radnode.db'}"
    else:
        need(_pg_available(), "PostgreSQL not reachable (RADNODE_TEST_PG)")
        pg_name, url = create_pg_database()
    proc = NodeProcess(tmp / "data", url)
    try:
        if pg_name:
            assert f"database at revision {HEAD_REVISION}" in proc.cli("db", "upgrade").stdout
        yield proc.start()
    finally:
        if proc.proc is not None:
            proc.stop()
        if pg_name:
            drop_pg_database(pg_name)


def code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code item; a value over 16 characters goes in Long Code Value."""
    item = Dataset()
    setattr(item, "LongCodeValue" if len(value) > 16 else "CodeValue", value)
    item.CodingSchemeDesignator, item.CodeMeaning = scheme, meaning
    return item


def references(study: str, series: str, sop_class: str, sops: list[str], where: str = "dicom") -> Dataset:
    """One Input/Output Information Sequence item (PS3.3 Table 10-3b)."""
    item = Dataset()
    item.TypeOfInstances, item.StudyInstanceUID, item.SeriesInstanceUID = "DICOM", study, series
    item.ReferencedSOPSequence = []
    for uid in sops:
        sop = Dataset()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = sop_class, uid
        item.ReferencedSOPSequence.append(sop)
    access = Dataset()
    if where == "dicom":
        access.RetrieveAETitle = "PACS"
        item.DICOMRetrievalSequence = [access]
    else:
        access.RetrieveURL = f"http://pacs.example/dicom-web/studies/{study}"
        item.WADORSRetrievalSequence = [access]
    return item


def workitem(plugin: str = "lung-quant", start: str = "20261203100000", patient: str = "P-A",
             study: str | None = None, complete: bool = True) -> Dataset:
    """A workitem for `plugin` on one CT series: every N-CREATE Type 1 and (when `complete`) Type 2 attribute."""
    ds = Dataset()
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "HIGH"
    ds.ProcedureStepLabel = f"AI: {plugin}"
    ds.WorklistLabel = "AI"
    ds.ScheduledProcedureStepStartDateTime = start
    ds.InputReadinessState = "READY"
    ds.ScheduledWorkitemCodeSequence = [code(plugin, "99RADNODE", f"run {plugin}")]
    study = study or generate_uid()
    ds.InputInformationSequence = [references(study, generate_uid(), CT_IMAGE, [generate_uid(), generate_uid()])]
    ds.PatientName, ds.PatientID = "Doe^Jane", patient
    if complete:
        for keyword in ("ScheduledProcessingParametersSequence", "ScheduledStationNameCodeSequence",
                        "ScheduledStationClassCodeSequence", "ScheduledStationGeographicLocationCodeSequence",
                        "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "IssuerOfAdmissionIDSequence",
                        "AdmittingDiagnosesCodeSequence", "ReferencedRequestSequence",
                        "ProcedureStepProgressInformationSequence", "UnifiedProcedureStepPerformedProcedureSequence"):
            setattr(ds, keyword, [])
        for keyword in ("CommentsOnTheScheduledProcedureStep", "StudyInstanceUID", "IssuerOfPatientID",
                        "PatientBirthDate", "PatientSex", "AdmissionID", "AdmittingDiagnosesDescription"):
            setattr(ds, keyword, None)
    return ds


def performed(plugin: str, outputs: list[Dataset]) -> Dataset:
    """An update with what was performed (the final state requirements of COMPLETED)."""
    item = Dataset()
    item.PerformedStationNameCodeSequence = [code("RADNODE", "99RADNODE", "radnode")]
    item.PerformedProcedureStepStartDateTime = "20261203100100"
    item.PerformedWorkitemCodeSequence = [code(plugin, "99RADNODE", f"run {plugin}")]
    item.PerformedProcedureStepEndDateTime = "20261203100500"
    item.OutputInformationSequence = outputs
    ds = Dataset()
    ds.UnifiedProcedureStepPerformedProcedureSequence = [item]
    return ds


def state_change(state: str, txn: str | None) -> Dataset:
    ds = Dataset()
    ds.ProcedureStepState = state
    if txn:
        ds.TransactionUID = txn
    return ds


class Client:
    """Plain HTTP against /dicomweb/workitems; checks that no answer ever shows a Transaction UID."""

    def __init__(self, node: NodeProcess) -> None:
        self.node, self.secrets = node, set()

    def __call__(self, method: str, path: str, body: Any = None, token: str | None = "default",
                 **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {"Content-Type": DICOM_JSON, "Accept": DICOM_JSON})
        if isinstance(body, Dataset):
            body = [body.to_json_dict()]
        r = self.node.api(method, "/dicomweb/workitems" + path, token=token, json=body, headers=headers, **kwargs)
        text = r.text + str(r.headers)
        assert TXN not in r.text and not any(s in text for s in self.secrets), f"Transaction UID leaked: {text}"
        return r

    def claim(self, uid: str) -> str:
        txn = generate_uid()
        self.secrets.add(txn)
        r = self("PUT", f"/{uid}/state", state_change("IN PROGRESS", txn))
        assert r.status_code == 200, r.text
        return txn

    def state(self, uid: str) -> str:
        r = self("GET", f"/{uid}")
        assert r.status_code == 200, r.text
        return r.json()[0][STATE]["Value"][0]

    def uids(self, query: str) -> list[str]:
        r = self("GET", "?" + query)
        assert r.status_code in (200, 204), r.text
        return [] if r.status_code == 204 else [d["00080018"]["Value"][0] for d in r.json()]


def refused(r: httpx.Response, status: int, *words: str) -> None:
    """A refusal with the status, its reason in the body and the Warning header."""
    assert r.status_code == status, (r.status_code, r.text)
    for word in words:
        assert word in r.json()["detail"] and word in r.headers["warning"], (word, r.text, r.headers)


def test_ups_rs_create_search_claim_update_complete(node):
    http = Client(node)
    study_a = generate_uid()
    a, b = generate_uid(), generate_uid()
    r = http("POST", f"?{a}", workitem(study=study_a))
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith(f"/dicomweb/workitems/{a}") and "warning" not in r.headers
    item_b = workitem("reference-threshold", "20261205080000", "P-B")
    item_b.ScheduledStationNameCodeSequence = [code("GPU-1", "99RADNODE", "radnode GPU host 1")]
    assert http("POST", f"?{b}", item_b).status_code == 201
    refused(http("POST", f"?{a}", workitem()), 409, "exists already")
    r = http("POST", "", workitem(complete=False))  # the provider assigns the UID and adds the Type 2 attributes
    assert r.status_code == 201 and "created with modifications" in r.headers["warning"], r.headers
    assert http.state(r.headers["location"].rsplit("/", 1)[1]) == "SCHEDULED"

    # search: state, workitem code (sequence matching), date-time range, patient, input study, paging
    assert {a, b} <= set(http.uids("ProcedureStepState=SCHEDULED&limit=1000"))
    assert a in http.uids("ScheduledWorkitemCodeSequence.CodeValue=lung-quant")
    assert b not in http.uids("ScheduledWorkitemCodeSequence.CodeValue=lung-quant")
    assert b in http.uids("ScheduledWorkitemCodeSequence.LongCodeValue=reference-threshold"
                          "&ScheduledWorkitemCodeSequence.CodingSchemeDesignator=99RADNODE")
    assert http.uids("ScheduledProcedureStepStartDateTime=20261205-20261206&ProcedureStepState=SCHEDULED") == [b]
    assert a in http.uids("ScheduledProcedureStepStartDateTime=-20261203235959")
    assert http.uids("ScheduledStationNameCodeSequence.CodeValue=GPU-1") == [b]
    assert http.uids("PatientID=P-B") == [b] and b in http.uids("PatientName=doe*")
    assert http.uids(f"InputInformationSequence.StudyInstanceUID={study_a}") == [a]
    assert http.uids(f"SOPInstanceUID={a},{b}") == [a, b]
    assert http.uids("PatientID=nobody") == [] and http("GET", "?PatientID=nobody").status_code == 204
    r = http("GET", "?ProcedureStepState=SCHEDULED&limit=1")
    assert len(r.json()) == 1 and "additional results" in r.headers["warning"]
    assert len(http.uids("ProcedureStepState=SCHEDULED&limit=1&offset=1")) == 1
    refused(http("GET", "?NoSuchKeyword=1"), 400, "unknown attribute")
    refused(http("GET", "?limit=0"), 400, "limit")

    r = http("GET", f"/{a}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(DICOM_JSON)
    item = r.json()[0]
    assert item["00080016"]["Value"] == ["1.2.840.10008.5.1.4.34.6.1"] and item[STATE]["Value"] == ["SCHEDULED"]
    assert item["00404010"]["Value"]  # ScheduledProcedureStepModificationDateTime, set by the provider
    refused(http("GET", f"/{generate_uid()}"), 404, "no workitem")

    # update while SCHEDULED: without a Transaction UID only; never the state or identity
    label = Dataset()
    label.ProcedureStepLabel = "AI: lung quantification"
    assert http("POST", f"/{a}", label).status_code == 200
    refused(http("POST", f"/{a}?{generate_uid()}", label), 409, "SCHEDULED")
    refused(http("POST", f"/{a}", state_change("COMPLETED", None)), 400, "ProcedureStepState")

    # claim; a second claim is refused; the workitem shows IN PROGRESS and no Transaction UID
    txn = http.claim(a)
    other = generate_uid()
    http.secrets.add(other)
    refused(http("PUT", f"/{a}/state", state_change("IN PROGRESS", other)), 409, "already IN PROGRESS")
    refused(http("PUT", f"/{a}/state", state_change("IN PROGRESS", txn)), 409, "already IN PROGRESS")
    assert http.state(a) == "IN PROGRESS" and a in http.uids("ProcedureStepState=IN PROGRESS")

    # update while IN PROGRESS: only with the Transaction UID
    progress = Dataset()
    progress.ProcedureStepProgressInformationSequence = [Dataset()]
    progress.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress = 50
    refused(http("POST", f"/{a}", progress), 400, "Transaction UID is missing")
    refused(http("POST", f"/{a}?{other}", progress), 400, "Transaction UID is incorrect")
    assert http("POST", f"/{a}?{txn}", progress).status_code == 200

    # complete: refused until the final state requirements are met, then with the outputs listed
    refused(http("PUT", f"/{a}/state", state_change("COMPLETED", txn)), 409, "UnifiedProcedureStepPerformedProcedure")
    refused(http("PUT", f"/{a}/state", state_change("COMPLETED", other)), 400, "incorrect")
    refused(http("PUT", f"/{a}/state", state_change("COMPLETED", None)), 400, "missing")
    bad_output = performed("lung-quant", [references(study_a, "1.2.3..4", SR, [generate_uid()])])
    refused(http("POST", f"/{a}?{txn}", bad_output), 400, "OutputInformationSequence item 1")
    sr_uid = generate_uid()
    outputs = [references(study_a, generate_uid(), SR, [sr_uid], where="wado-rs")]
    assert http("POST", f"/{a}?{txn}", performed("lung-quant", outputs)).status_code == 200
    assert http("PUT", f"/{a}/state", state_change("COMPLETED", txn)).status_code == 200
    r = http("PUT", f"/{a}/state", state_change("COMPLETED", txn))
    assert r.status_code == 200 and "already in the requested state of COMPLETED" in r.headers["warning"]
    refused(http("PUT", f"/{a}/state", state_change("CANCELED", txn)), 409, "COMPLETED")
    refused(http("POST", f"/{a}?{txn}", label), 400, "may no longer be updated")
    refused(http("PUT", f"/{a}/state", state_change("SCHEDULED", txn)), 400, "SCHEDULED only when created")
    done = http("GET", f"/{a}").json()[0]
    assert done[STATE]["Value"] == ["COMPLETED"] and sr_uid in str(done["00741216"])
    assert a in http.uids("ProcedureStepState=COMPLETED&ScheduledWorkitemCodeSequence.CodeValue=lung-quant")


def test_ups_rs_cancel_requests_in_both_states(node):
    http = Client(node)
    scheduled, running = generate_uid(), generate_uid()
    for uid in (scheduled, running):
        assert http("POST", f"?{uid}", workitem("cxr-pneumonia")).status_code == 201
    # concurrent claims: exactly one performer gets the workitem
    contested = generate_uid()
    assert http("POST", f"?{contested}", workitem()).status_code == 201
    claims = [state_change("IN PROGRESS", generate_uid()) for _ in range(6)]
    http.secrets |= {c.TransactionUID for c in claims}
    with ThreadPoolExecutor(len(claims)) as pool:
        codes = sorted(pool.map(lambda c: http("PUT", f"/{contested}/state", c).status_code, claims))
    assert codes == [200] + [409] * 5, codes

    # SCHEDULED: canceled at once, with the final state filled by the provider
    assert http("POST", f"/{scheduled}/cancelrequest").status_code == 202
    canceled = http("GET", f"/{scheduled}").json()[0]
    progress = canceled["00741002"]["Value"][0]
    assert canceled[STATE]["Value"] == ["CANCELED"] and progress["00404052"]["Value"]  # cancellation date-time
    assert progress["0074100E"]["Value"][0]["00080100"]["Value"] == ["110513"]  # discontinued, unspecified
    r = http("POST", f"/{scheduled}/cancelrequest")
    assert r.status_code == 202 and "already in the requested state of CANCELED" in r.headers["warning"]
    refused(http("PUT", f"/{scheduled}/state", state_change("IN PROGRESS", generate_uid())), 409, "CANCELED")

    # IN PROGRESS: recorded for the performer, who then cancels with its Transaction UID
    txn = http.claim(running)
    reason = Dataset()
    reason.ReasonForCancellation = "ordered twice"
    reason.ContactURI = "tel:+4930123"
    assert http("POST", f"/{running}/cancelrequest", reason).status_code == 202
    item = http("GET", f"/{running}").json()[0]
    assert item[STATE]["Value"] == ["IN PROGRESS"]
    assert item["00741002"]["Value"][0]["00741238"]["Value"] == ["ordered twice"]
    refused(http("POST", f"/{running}/cancelrequest", state_change("CANCELED", None)), 400, "carries only")
    assert http("PUT", f"/{running}/state", state_change("CANCELED", txn)).status_code == 200
    assert http.state(running) == "CANCELED"

    completed = generate_uid()
    assert http("POST", f"?{completed}", workitem()).status_code == 201
    txn = http.claim(completed)
    assert http("POST", f"/{completed}?{txn}", performed("lung-quant", [])).status_code == 200  # no outputs
    assert http("PUT", f"/{completed}/state", state_change("COMPLETED", txn)).status_code == 200
    refused(http("POST", f"/{completed}/cancelrequest"), 409, "COMPLETED")
    refused(http("POST", f"/{generate_uid()}/cancelrequest"), 404, "no workitem")
    # cancel by its performer needs a discontinuation reason (final state requirement X)
    bare = generate_uid()
    assert http("POST", f"?{bare}", workitem()).status_code == 201
    txn = http.claim(bare)
    refused(http("PUT", f"/{bare}/state", state_change("CANCELED", txn)), 409, "DiscontinuationReasonCode")


def test_ups_rs_refuses_bad_requests(node):
    http = Client(node)

    def create(ds: Dataset | Any, query: str = "", **kwargs: Any) -> httpx.Response:
        return http("POST", query, ds, **kwargs)

    missing = workitem()
    del missing.ProcedureStepLabel, missing.ScheduledProcedureStepStartDateTime
    refused(create(missing), 400, "ProcedureStepLabel", "ScheduledProcedureStepStartDateTime")
    refused(create(workitem("no-such-plugin")), 400, "unknown plugin 'no-such-plugin'")
    other_scheme = workitem()
    other_scheme.ScheduledWorkitemCodeSequence[0].CodingSchemeDesignator = "DCM"
    refused(create(other_scheme), 400, "99RADNODE")
    claimed = workitem()
    claimed.ProcedureStepState = "IN PROGRESS"
    refused(create(claimed), 400, "SCHEDULED")
    locked = workitem()
    locked.TransactionUID = generate_uid()
    refused(create(locked), 400, "Transaction UID")
    bad_input = workitem()
    bad_input.InputInformationSequence[0].SeriesInstanceUID = "1.2.abc"
    refused(create(bad_input), 400, "InputInformationSequence item 1", "SeriesInstanceUID")
    nowhere = workitem()
    del nowhere.InputInformationSequence[0].DICOMRetrievalSequence
    refused(create(nowhere), 400, "where to retrieve")
    no_inputs = workitem()
    no_inputs.InputInformationSequence = []
    refused(create(no_inputs), 400, "READY")
    bad_priority = workitem()
    bad_priority.ScheduledProcedureStepPriority = "URGENT"
    refused(create(bad_priority), 400, "URGENT")
    refused(create(workitem(), "?1.2.x"), 400, "not a valid UID")
    uid = generate_uid()
    differs = workitem()
    differs.SOPInstanceUID = generate_uid()
    refused(create(differs, f"?{uid}"), 400, "differs")
    two_codes = workitem()
    two_codes.ScheduledWorkitemCodeSequence.append(code("lung-quant", "99RADNODE", "again"))
    refused(create(two_codes), 400, "exactly one item")
    started = workitem()
    started.ProcedureStepProgressInformationSequence = [Dataset()]
    started.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress = 10
    refused(create(started), 400, "must be empty in a new workitem")
    refused(http("POST", "", [workitem().to_json_dict()] * 2), 400, "one dataset, not 2")
    bulk = workitem().to_json_dict() | {"00420011": {"vr": "OB", "BulkDataURI": "http://x/y"}}
    refused(http("POST", "", [bulk]), 400, "bulk data")
    refused(http("POST", "", content=b"{not json", headers={"Content-Type": DICOM_JSON}), 400, "not JSON")
    assert http("POST", "", content=b"<xml/>", headers={"Content-Type": "application/xml"}).status_code == 415
    refused(http("PUT", f"/{uid}/state", state_change("IN PROGRESS", generate_uid())), 404, "no workitem")
    assert http("POST", f"?{uid}", workitem()).status_code == 201
    emptied = Dataset()
    emptied.ProcedureStepLabel = None
    refused(http("POST", f"/{uid}", emptied), 400, "may not empty ProcedureStepLabel")
    refused(http("PUT", f"/{uid}/state", state_change("DONE", generate_uid())), 400, "'DONE'")
    # search parameters radnode cannot use are refused; fuzzy matching is answered literally, with a warning
    refused(http("GET", "?includefield=NoSuchKeyword"), 400, "unknown attribute")
    refused(http("GET", "?ScheduledWorkitemCodeSequence=x"), 400, "is a sequence")
    r = http("GET", f"?SOPInstanceUID={uid}&fuzzymatching=true")
    assert r.status_code == 200 and "fuzzymatching parameter is not supported" in r.headers["warning"]
    assert http("GET", f"/{uid}", headers={"Accept": "application/dicom+xml"}).status_code == 406
    # changing state needs the API token; reading needs one too (api_read_open is off)
    assert http("POST", "", workitem(), token=None).status_code == 401
    assert http("GET", "?PatientID=P-A", token=None).status_code == 401
    assert http("POST", f"/{uid}/subscribers/ORCH").status_code == 501


def test_dimse_ups_push_and_pull(node):
    http = Client(node)
    ae = AE(ae_title="ORCHESTRATOR")
    ae.add_requested_context(PUSH)
    ae.add_requested_context(PULL)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        # N-CREATE (Push): created, duplicate, not SCHEDULED, unknown plugin
        d = generate_uid()
        created = workitem("lung-quant", "20261204090000", "P-D")
        created.SpecificCharacterSet, created.PatientName = "ISO_IR 192", "Иванова^Мария"
        status, _ = assoc.send_n_create(created, PUSH, d)
        assert status.Status == 0x0000
        assert assoc.send_n_create(workitem(), PUSH, d)[0].Status == 0x0111
        claimed = workitem()
        claimed.ProcedureStepState = "IN PROGRESS"
        assert assoc.send_n_create(claimed, PUSH, generate_uid())[0].Status == 0xC309
        status, _ = assoc.send_n_create(workitem("no-such-plugin"), PUSH, generate_uid())
        assert status.Status == 0x0106 and "unknown plugin" in status.ErrorComment
        status, _ = assoc.send_n_create(workitem(complete=False), PUSH, generate_uid())
        assert status.Status == 0xB300  # created with modifications (Type 2 attributes added)

        # C-FIND (Pull): matching keys and return keys
        query = Dataset()
        query.ProcedureStepState = "SCHEDULED"
        query.ScheduledWorkitemCodeSequence = [Dataset()]
        query.ScheduledWorkitemCodeSequence[0].CodeValue = "lung-quant"
        query.ScheduledProcedureStepStartDateTime = "20261204-20261204"
        query.SOPInstanceUID = ""
        query.InputInformationSequence = []
        answers = [(s.Status, ds) for s, ds in assoc.send_c_find(query, PULL)]
        matches = [ds for status, ds in answers if status == 0xFF00]
        assert answers[-1][0] == 0x0000 and d in [m.SOPInstanceUID for m in matches]
        found = next(m for m in matches if m.SOPInstanceUID == d)
        assert found.InputInformationSequence[0].ReferencedSOPSequence and "PatientName" not in found

        # N-GET; claim by N-ACTION; a second claim and a wrong Transaction UID are refused
        status, got = assoc.send_n_get([0x00741000, 0x00404018], PUSH, d)
        assert status.Status == 0 and got.ProcedureStepState == "SCHEDULED" and "PatientID" not in got
        txn, other = generate_uid(), generate_uid()
        http.secrets |= {txn, other}
        assert assoc.send_n_action(state_change("IN PROGRESS", txn), 1, PUSH, d, meta_uid=PULL)[0].Status == 0
        assert assoc.send_n_action(state_change("IN PROGRESS", other), 1, PUSH, d, meta_uid=PULL)[0].Status == 0xC301
        assert assoc.send_n_action(state_change("IN PROGRESS", txn), 1, PUSH, d, meta_uid=PULL)[0].Status == 0xC302
        assert assoc.send_n_action(state_change("SCHEDULED", txn), 1, PUSH, d, meta_uid=PULL)[0].Status == 0xC303

        # N-SET: needs the Transaction UID; then complete
        update = performed("lung-quant", [references(generate_uid(), generate_uid(), SR, [generate_uid()])])
        assert assoc.send_n_set(update, PUSH, d, meta_uid=PULL)[0].Status == 0xC301
        update.TransactionUID = other
        assert assoc.send_n_set(update, PUSH, d, meta_uid=PULL)[0].Status == 0xC301
        update.TransactionUID = txn
        assert assoc.send_n_set(update, PUSH, d, meta_uid=PULL)[0].Status == 0x0000
        assert assoc.send_n_action(state_change("COMPLETED", other), 1, PUSH, d, meta_uid=PULL)[0].Status == 0xC301
        assert assoc.send_n_action(state_change("COMPLETED", txn), 1, PUSH, d, meta_uid=PULL)[0].Status == 0x0000
        assert assoc.send_n_action(state_change("COMPLETED", txn), 1, PUSH, d, meta_uid=PULL)[0].Status == 0xB306
        assert assoc.send_n_set(update, PUSH, d, meta_uid=PULL)[0].Status == 0xC300
        assert assoc.send_n_action(None, 2, PUSH, d)[0].Status == 0xC311  # cancel a completed one
        status, got = assoc.send_n_get([], PUSH, d)
        assert status.Status == 0 and got.ProcedureStepState == "COMPLETED" and "TransactionUID" not in got
        assert assoc.send_n_get([], PUSH, generate_uid())[0].Status == 0xC307
        subscribe = Dataset()
        subscribe.ReceivingAE, subscribe.DeletionLock = "ORCHESTRATOR", "FALSE"
        assert assoc.send_n_action(subscribe, 3, PUSH, d)[0].Status == 0xC315  # no event reports

        # the other front end sees the same workitems: DIMSE-made read over UPS-RS and the other way round
        item = http("GET", f"/{d}").json()[0]
        assert item[STATE]["Value"] == ["COMPLETED"] and item["00741216"]["Value"][0]["00404033"]["Value"]
        assert item["00100010"]["Value"] == [{"Alphabetic": "Иванова^Мария"}]
        assert str(assoc.send_n_get([0x00100010], PUSH, d)[1].PatientName) == "Иванова^Мария"
        e = generate_uid()
        assert http("POST", f"?{e}", workitem("cxr-pneumonia", "20261207120000")).status_code == 201
        query = Dataset()
        query.SOPInstanceUID = e
        query.ProcedureStepState = ""
        assert [ds.ProcedureStepState for s, ds in assoc.send_c_find(query, PULL) if s.Status == 0xFF00] == \
            ["SCHEDULED"]
        txn_e = generate_uid()
        http.secrets.add(txn_e)
        assert assoc.send_n_action(state_change("IN PROGRESS", txn_e), 1, PUSH, e, meta_uid=PULL)[0].Status == 0
        assert http.state(e) == "IN PROGRESS"
        assert http("POST", f"/{e}?{txn_e}", performed("cxr-pneumonia", [])).status_code == 200  # RS, DIMSE lock
        assert http("PUT", f"/{e}/state", state_change("COMPLETED", txn_e)).status_code == 200
        assert assoc.send_n_get([0x00741000], PUSH, e)[1].ProcedureStepState == "COMPLETED"

        # Request UPS Cancel (Push) of a SCHEDULED workitem: canceled, as UPS-RS shows
        f = generate_uid()
        assert http("POST", f"?{f}", workitem()).status_code == 201
        reason = Dataset()
        reason.ReasonForCancellation = "patient transferred"
        assert assoc.send_n_action(reason, 2, PUSH, f)[0].Status == 0x0000
        assert assoc.send_n_action(reason, 2, PUSH, f)[0].Status == 0xB304
        assert http.state(f) == "CANCELED"
    finally:
        assoc.release()
