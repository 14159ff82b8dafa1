"""Dispatch step, reports: what a job found, as one structure the FHIR and HL7 v2 senders map from.

Built from the job's findings (findings.json or the job row) and DICOM headers: the patient and study come from
the source series (or the SR, which copies them), the result objects from their own headers. Patient data is
carried only as the source carries it and is never logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.dispatch.errors import DeliveryError
from node.results import ObjectKind

SOP_CLASS_KIND: dict[str, ObjectKind] = {
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
}


@dataclass(frozen=True)
class Concept:
    """A coded concept: value, coding scheme designator (SCT, DCM, LN, 99RADNODE ...), meaning."""

    value: str
    scheme: str
    meaning: str

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> Concept:
        return cls(str(d["value"]), str(d["scheme"]), str(d["meaning"]))


@dataclass(frozen=True)
class Classification:
    concept: Concept
    probability: float
    threshold: float | None
    positive: bool | None
    triage: bool  # the plugin declares this concept a triage flag


@dataclass(frozen=True)
class Measurement:
    concept: Concept
    value: float
    unit: str  # UCUM
    segment: str | None


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object the job wrote (SR, SEG, SC)."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str


@dataclass(frozen=True)
class JobReport:
    """One job's result, ready to map to FHIR resources or an HL7 v2 message."""

    job_id: int
    plugin: str
    plugin_version: str
    weights_sha256: str | None
    # patient and study, as the source carries them (empty when absent)
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str  # DICOM PN as stored, e.g. "Doe^Jane"
    patient_birth_date: str  # YYYYMMDD
    patient_sex: str  # M, F, O or ""
    accession_number: str
    study_uid: str
    study_date: str
    study_time: str
    study_description: str
    source_series_uid: str
    source_modality: str
    observed_at: datetime  # when the result was made (the SR's content time, else now), UTC
    summary: str
    warnings: tuple[str, ...]
    classifications: tuple[Classification, ...]
    measurements: tuple[Measurement, ...]
    objects: tuple[ResultObject, ...] = field(default=())  # empty for a flag sent before the objects exist
    flag_only: bool = False  # a triage flag sent ahead of the full results

    @property
    def flagged(self) -> bool:
        """A positive classification the plugin declares a triage flag."""
        return any(c.triage and c.positive for c in self.classifications)

    @property
    def flags(self) -> tuple[Classification, ...]:
        return tuple(c for c in self.classifications if c.triage and c.positive)

    @property
    def sr(self) -> ResultObject | None:
        return next((o for o in self.objects if o.kind == "SR"), None)

    def redact(self, text: str) -> str:
        """`text` (a peer's error message) without the patient's ID, name parts, birth date or accession number."""
        for secret in {self.patient_id, self.patient_birth_date, self.accession_number,
                       *self.patient_name.replace("^", " ").replace("=", " ").split()}:
            if len(secret) > 1:
                text = text.replace(secret, "***")
        return text


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    if isinstance(value, MultiValue):  # e.g. two patient names: the first is the one to use
        value = value[0] if len(value) else None
    return "" if value is None else str(value).strip()


def _content_time(ds: Dataset | None) -> datetime | None:
    date, time = _text(ds, "ContentDate"), _text(ds, "ContentTime")
    if len(date) != 8:
        return None
    try:
        # DICOM content times are local to the writer; radnode writes them in UTC (node.results.common)
        return datetime.strptime(date + (time.split(".")[0] + "000000")[:6], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def build_report(job_id: int, findings: Mapping[str, Any], source: Dataset, objects: Sequence[Dataset] = (), *,
                 flag_only: bool = False) -> JobReport:
    """The report of one job: `findings` is findings.json (or the job row's findings with the same keys),
    `source` a header of the source series (patient, study), `objects` the headers of the result objects.

    Raises DeliveryError (permanent) when the findings lack what a report needs.
    """
    try:
        triage = {(t["value"], t["scheme"]) for t in findings.get("triage") or []}
        classifications = tuple(
            Classification(Concept.of(c["concept"]), float(c["probability"]), c.get("threshold"), c.get("positive"),
                           (c["concept"]["value"], c["concept"]["scheme"]) in triage)
            for c in findings.get("classifications") or [])
        measurements = tuple(
            Measurement(Concept.of(m["concept"]), float(m["value"]), str(m["unit"]), m.get("segment"))
            for m in findings.get("measurements") or [])
        plugin, version = str(findings["plugin"]), str(findings["plugin_version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DeliveryError(f"job {job_id}: findings cannot be reported: {type(exc).__name__}: {exc}",
                            permanent=True) from None
    refs = []
    for ds in objects:
        sop_class = str(ds.SOPClassUID)
        refs.append(ResultObject(SOP_CLASS_KIND.get(sop_class, "SC"), sop_class, str(ds.SOPInstanceUID),
                                 str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)))
    sr = next((ds for ds in objects if SOP_CLASS_KIND.get(str(ds.SOPClassUID)) == "SR"), None)
    return JobReport(
        job_id=job_id, plugin=plugin, plugin_version=version, weights_sha256=findings.get("weights_sha256"),
        patient_id=_text(source, "PatientID"), issuer_of_patient_id=_text(source, "IssuerOfPatientID"),
        patient_name=_text(source, "PatientName"), patient_birth_date=_text(source, "PatientBirthDate"),
        patient_sex=_text(source, "PatientSex"), accession_number=_text(source, "AccessionNumber"),
        study_uid=_text(source, "StudyInstanceUID"), study_date=_text(source, "StudyDate"),
        study_time=_text(source, "StudyTime"), study_description=_text(source, "StudyDescription"),
        source_series_uid=str(findings.get("source_series_uid") or _source_series(sr) or ""),
        source_modality=_text(source, "Modality") if source.get("Modality") not in ("SR", "SEG", "OT") else "",
        observed_at=_content_time(sr) or datetime.now(UTC),
        summary=str(findings.get("summary") or ""), warnings=tuple(findings.get("warnings") or ()),
        classifications=classifications, measurements=measurements, objects=tuple(refs), flag_only=flag_only,
    )


def _source_series(sr: Dataset | None) -> str | None:
    """The first series the SR's evidence names (Current Requested Procedure Evidence Sequence)."""
    if sr is None:
        return None
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            return str(series.SeriesInstanceUID)
    return None
