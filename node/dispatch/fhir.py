"""Dispatch step, FHIR: a job's report as one FHIR R4 transaction Bundle POSTed to an EHR's FHIR server.

The mapping follows the HL7 "DICOM SR to FHIR Resource Mapping" IG as far as R4 allows: the SR document becomes a
DiagnosticReport, each finding an Observation, the algorithm a Device, the source study an ImagingStudy. The IG is
written on R5 and points at SR, SEG and source instances with ImagingSelection, which R4 does not have. In R4 an
Observation's `derivedFrom` names the ImagingStudy (resolved) plus each result object as a logical reference: a
Reference with only `identifier` = urn:dicom:uid | urn:oid:<SOP Instance UID>, the IG's identifier form, which the
EHR does not have to resolve. Identifiers use the IG's system `urn:dicom:uid` for DICOM UIDs; the report and
observations get radnode UIDs (system urn:ietf:rfc:3986) derived like the DICOM outputs' UIDs from (source series,
plugin, version), so a retry, a redelivery, a re-run and the full results after a triage flag all address the same
resources: conditional create for Patient/ImagingStudy/Device, conditional update for the results.
Codes: SCT, DCM, LN, RADLEX map to their FHIR systems; a private scheme (99RADNODE, 99...) to
urn:radnode:coding-scheme:<designator>, the designator the SR's CodingSchemeIdentificationSequence declares.
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from node.dispatch.errors import DeliveryError
from node.dispatch.net import http_session
from node.dispatch.report import Concept, JobReport
from node.logs import uid_hash
from node.results.common import derive_uid
from node.settings import FhirDestination

log = logging.getLogger("radnode.dispatch.fhir")

TIMEOUT = 60.0  # seconds for the one transaction request
DICOM_UID = "urn:dicom:uid"  # the IG's system for DICOM UIDs; value urn:oid:<uid>
URI = "urn:ietf:rfc:3986"  # the value is a URI: radnode's own result identifiers (urn:oid:2.25....)
DEFAULT_PATIENT_SYSTEM = "urn:dicom:patient-id"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": DCM, "LN": LOINC, "RADLEX": "http://radlex.org", "UCUM": UCUM}
IMAGING = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
                       "display": "Imaging"}]}
RADIOLOGY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                         "display": "Radiology"}]}
REPORT_CODE = [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"},
               {"system": DCM, "code": "126000", "display": "Imaging Measurement Report"}]  # the TID 1500 title
FLAGGED = {"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}
POSITIVE = {"system": INTERPRETATION, "code": "POS", "display": "Positive"}
NEGATIVE = {"system": INTERPRETATION, "code": "NEG", "display": "Negative"}


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _id(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def _search(ident: dict[str, str]) -> str:
    """`identifier=system|value` as a FHIR search, `|`, `,`, `$` and `\\` escaped in the value, URL-encoded."""
    value = ident["value"]
    for ch in "\\|,$":
        value = value.replace(ch, "\\" + ch)
    return urlencode({"identifier": f"{ident['system']}|{value}"})


def coding(concept: Concept) -> dict[str, str]:
    """A FHIR Coding of a DICOM coded concept (the scheme designator mapped to a FHIR system URI)."""
    system = SYSTEMS.get(concept.scheme.upper(), f"urn:radnode:coding-scheme:{concept.scheme}")
    return {"system": system, "code": concept.value, "display": concept.meaning}


def patient_system(report: JobReport, dest: FhirDestination) -> str:
    """The Patient.identifier system of the source's PatientID: the destination's setting (the EHR's system for the
    PACS patient IDs: the one to set in production), else the IssuerOfPatientID (urn:oid: for an OID, as it is
    for a URI, else a urn under the default), else urn:dicom:patient-id (IDs of one unnamed issuer)."""
    issuer = report.issuer_of_patient_id
    if dest.patient_identifier_system:
        return dest.patient_identifier_system
    if issuer and all(part.isdigit() for part in issuer.split(".")):
        return _oid(issuer)
    if issuer and ":" in issuer and " " not in issuer:
        return issuer
    return f"{DEFAULT_PATIENT_SYSTEM}:{issuer.replace(' ', '_')}" if issuer else DEFAULT_PATIENT_SYSTEM


def _entry(resource: dict[str, Any], ident: dict[str, str], update: bool) -> dict[str, Any]:
    """A transaction entry addressed by `ident`: conditional update (PUT Type?identifier=) or conditional create
    (POST with ifNoneExist); its fullUrl is a UUID fixed by the identifier, so the same report gives the same
    Bundle byte for byte."""
    kind, query = resource["resourceType"], _search(ident)
    request = {"method": "PUT", "url": f"{kind}?{query}"} if update else {"method": "POST", "url": kind,
                                                                           "ifNoneExist": query}
    full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '|'.join((kind, ident['system'], ident['value'])))}"
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _ref(entry: dict[str, Any]) -> dict[str, str]:
    return {"reference": entry["fullUrl"]}


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _study_date(da: str) -> str | None:
    try:
        return datetime.strptime(da, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def _quantity(value: float, unit: str, label: str | None = None) -> dict[str, Any]:
    """valueQuantity in UCUM, or dataAbsentReason "not-a-number" for NaN/infinity (JSON and FHIR have neither)."""
    if not math.isfinite(value):
        return {"dataAbsentReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                                 "code": "not-a-number", "display": "Not a Number (NaN)"}]}}
    return {"valueQuantity": {"value": value, "unit": label or unit, "system": UCUM, "code": unit}}


def bundle(report: JobReport, dest: FhirDestination) -> dict[str, Any]:
    """The FHIR R4 transaction Bundle of one job's report: Patient, ImagingStudy and Device (conditional creates,
    matched by identifier), one Observation per classification and measurement and the DiagnosticReport
    (conditional updates by their stable identifiers, so a re-send updates and never duplicates). A flag-only
    report holds the positive triage Observations and a preliminary DiagnosticReport only, as conditional creates:
    it never overwrites full results that got there first, and the full results later update the same resources.

    Raises DeliveryError (permanent) when the report cannot be mapped: no PatientID, no study or source series,
    or a flag-only report without a positive triage flag.
    """
    missing = [what for what, value in (("PatientID", report.patient_id), ("StudyInstanceUID", report.study_uid),
                                        ("source series", report.source_series_uid)) if not value]
    if missing:
        raise DeliveryError(f"job {report.job_id}: no {' or '.join(missing)} in the source: the FHIR resources "
                            "cannot be matched to a patient and study; not sent", permanent=True)
    flag_only = report.flag_only
    if flag_only and not report.flags:
        raise DeliveryError(f"job {report.job_id}: a flag-only FHIR report needs a positive triage flag",
                            permanent=True)
    status = "preliminary" if flag_only else dest.report_status
    when = _when(report.observed_at)

    def result_id(what: str) -> dict[str, str]:
        return _id(URI, _oid(derive_uid(report.source_series_uid, report.plugin, report.plugin_version, "FHIR",
                                        what)))

    # Patient: identifier only. The EHR's master patient index owns names, birth dates and sex; a DICOM header's
    # copy may be stale or mistyped, and a stub carrying it would put a second version of the demographics into the
    # chart. The identifier is all the EHR needs to match (and, if unknown, to reconcile the stub later).
    patient_id = _id(patient_system(report, dest), report.patient_id)
    patient = _entry({"resourceType": "Patient", "identifier": [patient_id]}, patient_id, update=False)
    subject = _ref(patient)
    study_id = _id(DICOM_UID, _oid(report.study_uid))
    study: dict[str, Any] = {"resourceType": "ImagingStudy", "identifier": [study_id], "status": "available",
                             "subject": subject}
    if report.accession_number:
        study["identifier"].append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                          "code": "ACSN"}]}, "value": report.accession_number})
    if started := _study_date(report.study_date):
        study["started"] = started
    if report.source_modality:
        study["series"] = [{"uid": report.source_series_uid, "modality": {"system": DCM,
                                                                          "code": report.source_modality}}]
    study_entry = _entry(study, study_id, update=False)
    # the algorithm: the Device UID every output's Contributing Equipment carries (node.results Provenance.device_uid)
    device_id = _id(DICOM_UID, _oid(derive_uid("algorithm", report.plugin, report.plugin_version, "device", 0)))
    versions = [{"type": {"text": "plugin version"}, "value": report.plugin_version}]
    if report.weights_sha256:
        versions.append({"type": {"text": "model weights SHA-256"}, "value": report.weights_sha256})
    device = _entry({"resourceType": "Device", "identifier": [device_id], "type": {"text": "AI algorithm"},
                     "deviceName": [{"name": report.plugin, "type": "model-name"}], "version": versions},
                    device_id, update=False)
    evidence = [_ref(study_entry)] + [
        {"identifier": _id(DICOM_UID, _oid(o.sop_instance_uid)), "display": f"DICOM {o.kind} (AI result)"}
        for o in report.objects if o.kind in dest.objects]

    observations: list[dict[str, Any]] = []
    seen: dict[str, int] = {}

    def observation(key: str, concept: Concept, **values: Any) -> None:
        seen[key] = seen.get(key, 0) + 1  # the same concept twice (same segment): numbered, stable by order
        ident = result_id(key if seen[key] == 1 else f"{key} #{seen[key]}")
        resource = {"resourceType": "Observation", "identifier": [ident], "status": status, "category": [IMAGING],
                    "code": {"coding": [coding(concept)], "text": concept.meaning}, "subject": subject,
                    "effectiveDateTime": when, "issued": when, "device": _ref(device), "derivedFrom": evidence,
                    **values}
        observations.append(_entry(resource, ident, update=not flag_only))

    for c in report.flags if flag_only else report.classifications:
        values: dict[str, Any] = _quantity(c.probability, "1", "probability")
        if c.positive is not None:
            # a positive triage flag is critical abnormal (AA), first, so a worklist sorting on it shows it first
            values["interpretation"] = ([{"coding": [FLAGGED]}] if c.triage and c.positive else []) + [
                {"coding": [POSITIVE if c.positive else NEGATIVE]}]
        if c.threshold is not None:
            values["referenceRange"] = [{"high": {"value": c.threshold, "unit": "probability", "system": UCUM,
                                                  "code": "1"}, "text": "positive at or above the model's threshold"}]
        observation(f"classification {c.concept.scheme}:{c.concept.value}", c.concept, **values)
    for m in () if flag_only else report.measurements:
        values = _quantity(m.value, m.unit)
        if m.segment:
            values["bodySite"] = {"text": m.segment}
        observation(f"measurement {m.concept.scheme}:{m.concept.value} in {m.segment or '-'}", m.concept, **values)

    flags = ", ".join(c.concept.meaning for c in report.flags)
    conclusion = (f"AI triage flag: {flags}. Preliminary; the full AI results follow." if flag_only else
                  (f"URGENT - AI triage flag: {flags}. " if flags else "") + (report.summary or "AI result."))
    ident = result_id("report")
    diagnostic: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [ident] + ([_id(DICOM_UID, _oid(report.sr.sop_instance_uid))] if report.sr else []),
        "status": status, "category": [RADIOLOGY],
        "code": {"coding": REPORT_CODE, "text": f"AI result: {report.plugin} {report.plugin_version}"},
        "subject": subject, "effectiveDateTime": when, "issued": when, "imagingStudy": [_ref(study_entry)],
        "result": [_ref(o) for o in observations], "conclusion": conclusion}
    if report.flags:
        diagnostic["conclusionCode"] = [{"coding": [coding(c.concept)]} for c in report.flags]
    entries = [patient, study_entry, device, *observations, _entry(diagnostic, ident, update=not flag_only)]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _session(dest: FhirDestination) -> Any:
    session = http_session(dest.username, dest.password, dest.token, dest.verify_tls)
    session.headers.update({"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
                            "Prefer": "return=minimal"})  # the answer need not echo the resources (PHI)
    return session


def _outcome(response: Any, report: JobReport) -> str:
    """The OperationOutcome's diagnostics (or the body's start), redacted and trimmed to 300 characters."""
    try:
        body = response.json()
        issues = body.get("issue") or []
        text = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code")) for i in issues)
    except (ValueError, AttributeError):
        text = response.text
    return report.redact(" ".join(text.split()))[:300]


def send_fhir(report: JobReport, dest: FhirDestination, timeout: float = TIMEOUT) -> int:
    """POST the report's transaction Bundle to the FHIR base `dest.url`. Returns the number of resources the
    transaction-response lists as written or matched (every entry 200 or 201).

    Raises DeliveryError: permanent for an unmappable report and for HTTP 4xx other than 408/429 (the reason from
    the OperationOutcome, patient data removed); retryable for 408/429, 5xx, timeouts, connection errors and an
    answer that is not a complete transaction-response.
    """
    import requests

    document = bundle(report, dest)
    where = f"FHIR {dest.url}"
    try:
        with _session(dest) as session:
            response = session.post(dest.url.rstrip("/"), json=document, timeout=timeout)
    except requests.RequestException as exc:
        raise DeliveryError(f"{where}: {type(exc).__name__}: {report.redact(str(exc))[:300]}") from None
    if response.status_code >= 400:
        permanent = response.status_code < 500 and response.status_code not in (408, 429)
        raise DeliveryError(f"{where}: HTTP {response.status_code}: {_outcome(response, report)}",
                            permanent=permanent)
    try:
        answer = response.json()
        statuses = [str(e["response"]["status"]) for e in answer["entry"]]
    except (ValueError, KeyError, TypeError):
        raise DeliveryError(f"{where}: HTTP {response.status_code} without a transaction-response") from None
    bad = [s for s in statuses if s.split()[0] not in ("200", "201")]
    if answer.get("type") != "transaction-response" or len(statuses) != len(document["entry"]) or bad:
        raise DeliveryError(f"{where}: incomplete transaction-response ({len(statuses)} of "
                            f"{len(document['entry'])} entries; not written: {', '.join(bad[:5]) or '-'})")
    log.info("job %d: FHIR transaction to %s: %d resources (study %s%s)", report.job_id, dest.name, len(statuses),
             uid_hash(report.study_uid), ", flag only" if report.flag_only else "")
    return len(statuses)
