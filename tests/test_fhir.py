"""The `fhir` destination: a job's report as a FHIR R4 transaction Bundle (node/dispatch/fhir.py), every resource
validated with fhir.resources, sent to the FHIR server of tests/fhir_server.py: idempotent re-sends, a triage flag
first and the full results after it, permanent and retryable errors, no patient data in logs or errors."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B import get_fhir_model_class
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.dispatch.errors import DeliveryError
from node.dispatch.fhir import bundle, coding, patient_system, send_fhir
from node.dispatch.report import Concept, JobReport, build_report
from node.results.common import Provenance, derive_uid
from node.settings import FhirDestination
from plugins.lung_quant import MANIFEST as LUNG_QUANT
from tests.conftest import free_port
from tests.fhir_server import FhirServer

SR_CLASS, SEG_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"
SCT, DCM = "http://snomed.info/sct", "http://dicom.nema.org/resources/ontology/DCM"
ABNORMAL = {"value": "408574004", "scheme": "SCT", "meaning": "Imaging result abnormal"}
VOLUME = {"value": "118565006", "scheme": "SCT", "meaning": "Volume"}


def findings(series_uid: str) -> dict[str, Any]:
    """A lung-quant job's findings.json (its measurements) with a ct-chest-triage style triage classification."""
    def measure(concept: dict[str, str], value: float, unit: str, segment: str) -> dict[str, Any]:
        return {"concept": concept, "value": value, "unit": unit, "segment": segment, "frame": None}

    laa = {"value": "LAA950", "scheme": "99RADNODE", "meaning": "Percent lung volume below -950 HU (LAA-950)"}
    mld = {"value": "112181", "scheme": "DCM", "meaning": "Mean Attenuation Coefficient"}
    return {
        "plugin": "lung-quant", "plugin_version": "1.0.0", "weights_sha256": "ab" * 32, "source_series_uid": series_uid,
        "summary": "Lungs 5261 mL (left 2450 mL, right 2811 mL); LAA-950 7.4 %; MLD -842 HU.",
        "warnings": [], "triage": [ABNORMAL],
        "classifications": [
            {"concept": ABNORMAL, "probability": 0.91, "threshold": 0.5, "positive": True},
            {"concept": {"value": "87433001", "scheme": "SCT", "meaning": "Pulmonary emphysema"},
             "probability": 0.21, "threshold": 0.5, "positive": False},
        ],
        "measurements": [
            measure(VOLUME, 2450.3, "mL", "left lung"), measure(VOLUME, 2810.7, "mL", "right lung"),
            measure(VOLUME, 5261.0, "mL", "both lungs"), measure(laa, 7.42, "%", "both lungs"),
            measure(mld, -842.1, "[hnsf'U]", "both lungs"),
        ],
    }


@pytest.fixture
def source(ct_dir: Path) -> Dataset:
    """The shared chest CT's header (patient and study as the source carries them)."""
    return dcmread(ct_dir / "1-01.dcm", stop_before_pixels=True)


def result_objects(source: Dataset) -> list[Dataset]:
    """Headers of the SR and SEG a lung-quant job writes (UIDs as node.results derives them)."""
    objects = []
    for kind, sop_class in (("SR", SR_CLASS), ("SEG", SEG_CLASS)):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = derive_uid(source.SeriesInstanceUID, "lung-quant", "1.0.0", kind, 0)
        ds.SeriesInstanceUID = derive_uid(source.SeriesInstanceUID, "lung-quant", "1.0.0", kind, "series")
        ds.StudyInstanceUID = source.StudyInstanceUID
        ds.ContentDate, ds.ContentTime = "20261203", "101530"
        objects.append(ds)
    return objects


def full_report(source: Dataset, job_id: int = 7) -> JobReport:
    return build_report(job_id, findings(str(source.SeriesInstanceUID)), source, result_objects(source))


def flag_report(source: Dataset) -> JobReport:
    return build_report(7, findings(str(source.SeriesInstanceUID)), source, (), flag_only=True)


def destination(url: str = "http://127.0.0.1:1/fhir", **kw: Any) -> FhirDestination:
    return FhirDestination(kind="fhir", name="ehr", url=url, **kw)


def resources(document: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == kind]


def by_code(observations: list[dict[str, Any]], code: str, segment: str | None = None) -> dict[str, Any]:
    [found] = [o for o in observations if o["code"]["coding"][0]["code"] == code
               and (segment is None or o.get("bodySite", {}).get("text") == segment)]
    return found


# --- the Bundle ------------------------------------------------------------------------------------------


def test_bundle_maps_the_report(source: Dataset) -> None:
    report = full_report(source)
    document = bundle(report, destination())
    assert document["type"] == "transaction"
    kinds = [e["resource"]["resourceType"] for e in document["entry"]]
    assert kinds == ["Patient", "ImagingStudy", "Device"] + ["Observation"] * 7 + ["DiagnosticReport"]
    [patient] = resources(document, "Patient")
    # identifier only: no name, birth date or sex from the DICOM header
    assert patient == {"resourceType": "Patient",
                       "identifier": [{"system": "urn:dicom:patient-id", "value": "Lung_Dx-A0001"}]}
    assert document["entry"][0]["request"] == {
        "method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn%3Adicom%3Apatient-id%7CLung_Dx-A0001"}
    [study] = resources(document, "ImagingStudy")
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"}
    assert study["series"] == [{"uid": source.SeriesInstanceUID, "modality": {"system": DCM, "code": "CT"}}]
    assert study["started"] == "2007-04-04"
    [device] = resources(document, "Device")
    # the same Device UID the SR/SEG/SC carry in their Contributing Equipment
    assert device["identifier"][0]["value"] == f"urn:oid:{Provenance(LUNG_QUANT).device_uid}"
    assert {"type": {"text": "model weights SHA-256"}, "value": "ab" * 32} in device["version"]
    assert [e["request"]["method"] for e in document["entry"]] == ["POST"] * 3 + ["PUT"] * 8

    observations = resources(document, "Observation")
    flagged = by_code(observations, "408574004")
    assert [i["coding"][0]["code"] for i in flagged["interpretation"]] == ["AA", "POS"]
    assert flagged["valueQuantity"] == {"value": 0.91, "unit": "probability", "system": "http://unitsofmeasure.org",
                                        "code": "1"}
    assert flagged["referenceRange"][0]["high"]["value"] == 0.5
    assert [i["coding"][0]["code"] for i in by_code(observations, "87433001")["interpretation"]] == ["NEG"]
    left = by_code(observations, "118565006", "left lung")
    assert left["valueQuantity"] == {"value": 2450.3, "unit": "mL", "system": "http://unitsofmeasure.org",
                                     "code": "mL"}
    assert left["code"]["coding"] == [{"system": SCT, "code": "118565006", "display": "Volume"}]
    assert by_code(observations, "LAA950")["code"]["coding"][0]["system"] == "urn:radnode:coding-scheme:99RADNODE"
    assert by_code(observations, "112181")["code"]["coding"][0]["system"] == DCM
    sr_uid = report.sr.sop_instance_uid
    study_url = document["entry"][1]["fullUrl"]
    for o in observations:
        assert o["status"] == "preliminary" and o["effectiveDateTime"] == "2026-12-03T10:15:30+00:00"
        assert o["device"] == {"reference": document["entry"][2]["fullUrl"]}
        # the ImagingStudy, and the SR as a logical reference (R4 has no ImagingSelection); SEG not in `objects`
        assert o["derivedFrom"] == [{"reference": study_url}, {
            "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"}, "display": "DICOM SR (AI result)"}]
    assert len({json.dumps(o["identifier"]) for o in observations}) == 7  # stable, distinct identifiers

    [report_resource] = resources(document, "DiagnosticReport")
    assert report_resource["status"] == "preliminary"  # the destination's default
    assert report_resource["category"][0]["coding"][0]["code"] == "RAD"
    assert report_resource["code"]["coding"][0] == {"system": "http://loinc.org", "code": "18748-4",
                                                    "display": "Diagnostic imaging study"}
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"} in report_resource["identifier"]
    assert report_resource["result"] == [{"reference": e["fullUrl"]} for e in document["entry"][3:10]]
    assert report_resource["conclusion"].startswith("URGENT - AI triage flag: Imaging result abnormal. Lungs 5261")
    assert report_resource["conclusionCode"] == [{"coding": [{"system": SCT, "code": "408574004",
                                                              "display": "Imaging result abnormal"}]}]
    assert report_resource["imagingStudy"] == [{"reference": study_url}]
    assert document["entry"][-1]["request"]["url"].startswith("DiagnosticReport?identifier=urn%3Aietf%3Arfc%3A3986")
    # deterministic: a retry sends the same Bundle
    assert json.dumps(bundle(full_report(source, job_id=8), destination())) == json.dumps(document)


def test_bundle_options(source: Dataset) -> None:
    dest = destination(report_status="final", objects=["SR", "SEG"], patient_identifier_system="urn:oid:1.2.3.4")
    document = bundle(full_report(source), dest)
    assert {r["status"] for r in resources(document, "Observation")} == {"final"}
    assert resources(document, "DiagnosticReport")[0]["status"] == "final"
    assert resources(document, "Patient")[0]["identifier"][0]["system"] == "urn:oid:1.2.3.4"
    derived = resources(document, "Observation")[0]["derivedFrom"]
    assert [d.get("display") for d in derived] == [None, "DICOM SR (AI result)", "DICOM SEG (AI result)"]


@pytest.mark.parametrize(("issuer", "setting", "expected"), [
    ("", None, "urn:dicom:patient-id"),
    ("1.2.840.99.1", None, "urn:oid:1.2.840.99.1"),
    ("https://hospital.example/mrn", None, "https://hospital.example/mrn"),
    ("HOSP A", None, "urn:dicom:patient-id:HOSP_A"),
    ("1.2.840.99.1", "urn:oid:9.9", "urn:oid:9.9"),
])
def test_patient_identifier_system(source: Dataset, issuer: str, setting: str | None, expected: str) -> None:
    source.IssuerOfPatientID = issuer
    report = full_report(source)
    assert patient_system(report, destination(patient_identifier_system=setting)) == expected


def test_coding_systems() -> None:
    assert coding(Concept("18748-4", "LN", "x"))["system"] == "http://loinc.org"
    assert coding(Concept("RID5", "RADLEX", "x"))["system"] == "http://radlex.org"
    assert coding(Concept("X1", "99ACME", "x"))["system"] == "urn:radnode:coding-scheme:99ACME"


def test_every_resource_validates(source: Dataset) -> None:
    bundle_model = get_fhir_model_class("Bundle")
    for report in (full_report(source), flag_report(source)):
        document = bundle(report, destination(objects=["SR", "SEG"]))
        bundle_model.model_validate(document)
        for entry in document["entry"]:
            get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])


def test_flag_only_bundle_is_short(source: Dataset) -> None:
    document = bundle(flag_report(source), destination(report_status="final"))
    kinds = [e["resource"]["resourceType"] for e in document["entry"]]
    assert kinds == ["Patient", "ImagingStudy", "Device", "Observation", "DiagnosticReport"]
    [observation] = resources(document, "Observation")
    assert observation["interpretation"][0]["coding"][0]["code"] == "AA"
    [report] = resources(document, "DiagnosticReport")
    assert report["status"] == "preliminary"  # always, whatever the destination says
    assert report["conclusion"].startswith("AI triage flag: Imaging result abnormal")
    # conditional creates: a flag arriving late never overwrites the full results
    assert all(e["request"]["method"] == "POST" and e["request"]["ifNoneExist"] for e in document["entry"])
    full = bundle(full_report(source), destination())
    assert report["identifier"][0] == resources(full, "DiagnosticReport")[0]["identifier"][0]
    assert observation["identifier"] == by_code(resources(full, "Observation"), "408574004")["identifier"]


def test_non_finite_value_is_data_absent(source: Dataset) -> None:
    data = findings(str(source.SeriesInstanceUID))
    data["measurements"][3]["value"] = float("nan")
    document = bundle(build_report(7, data, source, result_objects(source)), destination())
    laa = by_code(resources(document, "Observation"), "LAA950")
    assert "valueQuantity" not in laa and laa["dataAbsentReason"]["coding"][0]["code"] == "not-a-number"
    get_fhir_model_class("Bundle").model_validate(document)


def test_unmappable_reports_are_permanent_errors(source: Dataset) -> None:
    del source.PatientID
    with pytest.raises(DeliveryError, match="no PatientID") as caught:
        bundle(full_report(source), destination())
    assert caught.value.permanent
    source.PatientID = "P1"
    data = findings(str(source.SeriesInstanceUID))
    data["triage"] = []
    with pytest.raises(DeliveryError, match="needs a positive triage flag") as caught:
        bundle(build_report(7, data, source, (), flag_only=True), destination())
    assert caught.value.permanent


# --- against the server ----------------------------------------------------------------------------------


def counts(fhir: FhirServer) -> dict[str, int]:
    return {k: len(fhir.resources(k)) for k in ("Patient", "ImagingStudy", "Device", "Observation",
                                                 "DiagnosticReport")}


def test_send_and_resend_adds_no_duplicates(source: Dataset) -> None:
    with FhirServer(authorization="Bearer s3cret") as fhir:
        dest = destination(fhir.url, token="s3cret")
        assert send_fhir(full_report(source), dest) == 11
        once = counts(fhir)
        assert once == {"Patient": 1, "ImagingStudy": 1, "Device": 1, "Observation": 7, "DiagnosticReport": 1}
        assert send_fhir(full_report(source, job_id=8), dest) == 11  # a retry or redelivery
        assert counts(fhir) == once
        [report] = fhir.resources("DiagnosticReport")
        assert report["meta"]["versionId"] == "2"
        assert report["subject"]["reference"] == f"Patient/{fhir.resources('Patient')[0]['id']}"
        stored = {f"{r['resourceType']}/{r['id']}" for k in once for r in fhir.resources(k)}
        assert set(fhir.iter_references()) <= stored  # every reference resolves on the server
        post = fhir.requests[0]
        assert post.method == "POST" and post.path == "/fhir"
        assert post.headers["Content-Type"] == "application/fhir+json"


def test_an_existing_patient_and_study_are_matched_not_changed(source: Dataset) -> None:
    with FhirServer() as fhir:
        known = {"resourceType": "Patient", "name": [{"family": "Chart", "given": ["Kept"]}],
                 "identifier": [{"system": "urn:oid:1.2.3", "value": "Lung_Dx-A0001"}]}
        pid = fhir.seed(known)
        fhir.seed({"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": f"Patient/{pid}"},
                   "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"}],
                   "description": "from the PACS"})
        send_fhir(full_report(source), destination(fhir.url, patient_identifier_system="urn:oid:1.2.3",
                                                    username="radnode", password="pw"))
        [patient] = fhir.resources("Patient")
        assert patient["name"] == known["name"] and patient["meta"]["versionId"] == "1"
        [study] = fhir.resources("ImagingStudy")
        assert study["description"] == "from the PACS"
        assert all(o["subject"]["reference"] == f"Patient/{pid}" for o in fhir.resources("Observation"))
        assert fhir.requests[-1].headers["Authorization"].startswith("Basic ")


def test_flag_first_then_full_results_leave_no_stale_duplicate(source: Dataset) -> None:
    with FhirServer() as fhir:
        dest = destination(fhir.url, report_status="final")
        assert send_fhir(flag_report(source), dest) == 5
        [flag] = fhir.resources("DiagnosticReport")
        assert flag["status"] == "preliminary" and len(flag["result"]) == 1
        [observation] = fhir.resources("Observation")
        assert observation["interpretation"][0]["coding"][0]["code"] == "AA"

        send_fhir(full_report(source), dest)
        assert counts(fhir) == {"Patient": 1, "ImagingStudy": 1, "Device": 1, "Observation": 7,
                                "DiagnosticReport": 1}
        [report] = fhir.resources("DiagnosticReport")
        assert report["id"] == flag["id"] and report["status"] == "final" and len(report["result"]) == 7
        updated = [o for o in fhir.resources("Observation") if o["id"] == observation["id"]]
        assert updated[0]["status"] == "final" and len(updated[0]["derivedFrom"]) == 2

        send_fhir(flag_report(source), dest)  # a flag that arrives late (redelivered) changes nothing
        [still] = fhir.resources("DiagnosticReport")
        assert still["status"] == "final" and still["meta"] == report["meta"]
        assert len(fhir.resources("Observation")) == 7


def test_server_refuses_invalid_resources() -> None:
    """The test server's validation is real: an Observation without status is a 400 and nothing is stored."""
    with FhirServer() as fhir:
        entry = {"fullUrl": "urn:uuid:0b5d8e3c-1d7e-4c55-9a4f-3c3c1e2f0a01", "request": {"method": "POST",
                 "url": "Observation"}, "resource": {"resourceType": "Observation", "code": {"text": "x"}}}
        answer = requests.post(fhir.url, json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
                               headers={"Content-Type": "application/fhir+json"}, timeout=10)
        assert answer.status_code == 400
        assert answer.json()["resourceType"] == "OperationOutcome" and "status" in answer.text
        assert fhir.resources("Observation") == []


PHI = {"PatientID": "PX-5550123", "PatientName": "Doe^Jane", "PatientBirthDate": "19610203",
       "AccessionNumber": "ACC778899"}


def test_errors_are_permanent_or_retryable_and_carry_no_phi(source: Dataset, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    for keyword, value in PHI.items():
        setattr(source, keyword, value)
    report = full_report(source)
    caplog.set_level(logging.DEBUG)
    errors: list[DeliveryError] = []

    def fails(dest: FhirDestination, permanent: bool, match: str, timeout: float = 60.0) -> None:
        with pytest.raises(DeliveryError, match=match) as caught:
            send_fhir(report, dest, timeout=timeout)
        assert caught.value.permanent is permanent
        errors.append(caught.value)

    with FhirServer(create_patients=False) as fhir:
        # an EHR that creates no patients answers 422 naming the identifier: permanent, the ID removed
        fails(destination(fhir.url), True, r"HTTP 422: Patient urn:dicom:patient-id\|\*\*\* is unknown")
    with FhirServer(authorization="Bearer right") as fhir:
        fails(destination(fhir.url, token="wrong"), True, "HTTP 401: authorization required")
        for status, permanent in ((400, True), (404, True), (408, False), (429, False), (500, False), (503, False)):
            fhir.fail(status)
            fails(destination(fhir.url, token="right"), permanent, f"HTTP {status}")
        fhir.hang(5)
        t = time.monotonic()
        fails(destination(fhir.url, token="right"), False, "Timeout", timeout=0.5)
        assert time.monotonic() - t < 4
        assert send_fhir(report, destination(fhir.url, token="right")) == 11
    fails(destination(f"http://127.0.0.1:{free_port()}/fhir"), False, "ConnectionError")
    fails(destination("http://127.0.0.1:1/fhir", verify_tls=False), False, "ConnectionError")

    said = caplog.text + "\n".join(str(e) for e in errors)
    assert "FHIR transaction to ehr: 11 resources" in caplog.text
    for value in (*PHI.values(), "Doe", "Jane"):
        assert value not in said, value
