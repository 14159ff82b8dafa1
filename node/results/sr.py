"""Encode step, SR: a plugin's Findings as a Comprehensive 3D SR, TID 1500 Measurement Report (highdicom)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.results.common import (
    Provenance,
    coded,
    declare_private_schemes,
    derive_uid,
    drop_incomplete_references,
    series_number,
    source_header,
)
from node.router import normalise_body_part
from plugins.base import Findings, Image, Measurement, SourceRef

# Procedure reported (TID 1500 row 4, CID 100 "Quantitative Diagnostic Imaging Procedures"): LOINC
# "<modality> unspecified body region" from CID 100 per modality, LOINC 24627-2 "CT Chest" when the
# series is a chest CT, and SCT 363679005 "Imaging procedure" (also in CID 100) for anything else.
_CT_CHEST = CodedConcept("24627-2", "LN", "CT Chest")
_PROCEDURES: dict[str, CodedConcept] = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": CodedConcept("49118-3", "LN", "NM unspecified body region"),
    "CR": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "DX": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "DR": CodedConcept("43468-8", "LN", "XR unspecified body region"),
}
_IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# Qualitative evaluation of a classification: the finding's concept = Present / Absent (SNOMED CT
# qualifier values); its probability is a TID 300 measurement "Probability" in UCUM "1".
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
# Free text of the report (TID 1500 row 12-14: CONTAINER "Qualitative Evaluations" holding TEXT items):
# the plugin's summary as DCM "Summary", each quality warning as DCM "Comment".
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SUMMARY = CodedConcept(codes.DCM.Summary.value, "DCM", codes.DCM.Summary.meaning)
COMMENT = CodedConcept(codes.DCM.Comment.value, "DCM", codes.DCM.Comment.meaning)

UNIT_MEANINGS = {
    "1": "no units",
    "%": "percent",
    "mL": "milliliter",
    "ml": "milliliter",
    "L": "liter",
    "mm": "millimeter",
    "cm": "centimeter",
    "mm2": "square millimeter",
    "cm2": "square centimeter",
    "mm3": "cubic millimeter",
    "cm3": "cubic centimeter",
    "[hnsf'U]": "Hounsfield unit",
    "s": "second",
    "ms": "millisecond",
}


def encode_sr(
    findings: Findings,
    image: Image,
    sources: Mapping[str, Dataset],
    prov: Provenance,
    source_series_uid: str,
    seg: Dataset | None = None,
) -> Dataset:
    """Comprehensive 3D SR, TID 1500 Measurement Report of the findings. `sources` maps SOPInstanceUID ->
    source dataset (headers suffice) for every entry of image.sources; `seg` is the SEG written for the
    same job (its segments are referenced), if any.

    Raises ValueError on findings it cannot encode: not-applicable findings, an image without sources
    or a source missing from `sources`, a non-finite value or an empty unit, a segment the manifest
    does not declare, a SEG of another study or without the referenced segment.
    """
    if findings.not_applicable is not None:
        raise ValueError(f"not-applicable findings have no SR: {findings.not_applicable}")
    evidence = _evidence(image, sources)
    if seg is not None and seg.get("StudyInstanceUID") != evidence[0].get("StudyInstanceUID"):
        raise ValueError("the SEG belongs to another study than the source images")
    manifest = prov.manifest
    algorithm = hd.sr.AlgorithmIdentification(name=manifest.name, version=manifest.version)
    source_images = [
        hd.sr.SourceImageForMeasurementGroup(s.sop_class_uid, s.sop_instance_uid, _frames(s)) for s in image.sources
    ]

    def tracking(key: str, label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=prov.uid(source_series_uid, "SR", f"tracking:{key}"), identifier=label)

    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]
    groups = []
    for c in findings.classifications:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"finding:{c.concept.scheme}:{c.concept.value}", c.concept.meaning),
                finding_type=coded(c.concept),
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name=manifest.name, version=manifest.version, parameters=[f"threshold={c.threshold:g}"]
                ),
                measurements=[hd.sr.Measurement(name=PROBABILITY, value=c.probability, unit=_unit("1"))],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(coded(c.concept), PRESENT if c.positive else ABSENT)
                ],
                source_images=source_images,
            )
        )

    specs = {s.label: s for s in manifest.segments}
    labels = [s.segment for s in findings.segmentations]
    labels += [m.segment for m in findings.measurements if m.segment is not None and m.segment not in labels]
    labels = list(dict.fromkeys(labels))
    for label in labels:
        if label not in specs:
            raise ValueError(f"segment {label!r} is not declared in the manifest of {manifest.name}")
        spec = specs[label]
        common = dict(
            tracking_identifier=tracking(f"segment:{label}", label),
            finding_type=coded(spec.type),
            finding_category=coded(spec.category),
            algorithm_id=algorithm,
            measurements=[_measurement(m) for m in findings.measurements if m.segment == label and m.frame is None]
            or None,
        )
        if seg is None:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(source_images=source_images, **common))
        else:
            # TID 1411 for 2D too: TID 1410's "Referenced Segmentation Frame" as highdicom writes it
            # carries both ReferencedFrameNumber and ReferencedSegmentNumber, which dciodvfy rejects
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=_segment_number(seg, label),
                source_images=[_source_for_segmentation(s) for s in image.sources],
            )
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common))

    # per-frame measurements (an ultrasound frame's area): one group per (segment, frame), its source the frame
    per_frame: dict[tuple[str | None, int], list] = {}
    for m in findings.measurements:
        if m.frame is not None:
            per_frame.setdefault((m.segment, m.frame), []).append(_measurement(m))
    for (label, k), items in sorted(per_frame.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        ref = image.sources[k]
        key = f"frame:{label or 'image'}:{k}"
        extra = {} if label is None else {"finding_type": coded(specs[label].type),
                                          "finding_category": coded(specs[label].category)}
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(key, f"{label or 'image'}, frame {k + 1}"),
                algorithm_id=algorithm,
                measurements=items,
                source_images=[hd.sr.SourceImageForMeasurementGroup(ref.sop_class_uid, ref.sop_instance_uid,
                                                                    _frames(ref))],
                **extra,
            )
        )
    whole = [_measurement(m) for m in findings.measurements if m.segment is None and m.frame is None]
    if whole or not groups:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("image", "whole image"),
                algorithm_id=algorithm,
                measurements=whole or None,
                source_images=source_images,
            )
        )

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # identifies the device (this node's serial + the plugin version), not the job
        uid=derive_uid(prov.device_serial_number, manifest.name, manifest.version, "device", 0),
        name=f"{prov.model_name}: {manifest.name} {manifest.version}",
        manufacturer_name=prov.manufacturer,
        model_name=prov.model_name,
        serial_number=prov.device_serial_number,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=_procedure(image, evidence[0]), imaging_measurements=groups
    )
    texts = [(SUMMARY, findings.summary)] if findings.summary.strip() else []
    texts += [(COMMENT, w) for w in (*image.warnings, *findings.warnings) if w.strip()]
    if texts:
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(name=n, value=v, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
                for n, v in texts
            ]
        )
        report[0].ContentSequence.append(container)

    if seg is not None:
        evidence.append(seg)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=prov.uid(source_series_uid, "SR", "series"),
        series_number=series_number(manifest.name, "SR"),
        sop_instance_uid=prov.uid(source_series_uid, "SR", 0),
        instance_number=1,
        manufacturer=prov.manufacturer,
        manufacturer_model_name=prov.model_name,
        software_versions=prov.software_versions,
        device_serial_number=prov.device_serial_number,
        institution_name=prov.institution_name,
        series_description=prov.series_description("SR"),
        # complete and final as the algorithm's output; unverified: no person has checked it
        is_complete=True,
        is_final=True,
        is_verified=False,
    )
    drop_incomplete_references(sr)
    declare_private_schemes(sr)
    return sr


def _evidence(image: Image, sources: Mapping[str, Dataset]) -> list[Dataset]:
    if not image.sources:
        raise ValueError("the image has no source instances to reference")
    evidence: dict[str, Dataset] = {}
    for ref in image.sources:
        if ref.sop_instance_uid not in sources:
            raise ValueError(f"source instance {_short(ref)} is missing from the source datasets")
        evidence.setdefault(ref.sop_instance_uid, sources[ref.sop_instance_uid])
    # highdicom copies the patient/study module from the first instance: make that copy valid
    first = source_header(next(iter(evidence.values())))
    return [first, *list(evidence.values())[1:]]


def _short(ref: SourceRef) -> str:
    return "..." + ref.sop_instance_uid[-8:]


def _unit(unit: str) -> CodedConcept:
    if not unit.strip():
        raise ValueError("a measurement unit must be a UCUM code, got an empty string")
    return CodedConcept(value=unit, scheme_designator="UCUM", meaning=UNIT_MEANINGS.get(unit, unit))


def _measurement(m: Measurement) -> hd.sr.Measurement:
    if not math.isfinite(m.value):
        raise ValueError(f"measurement {m.concept.meaning} is not a finite number")
    return hd.sr.Measurement(name=coded(m.concept), value=float(m.value), unit=_unit(m.unit))


def _segment_number(seg: Dataset, label: str) -> int:
    for item in seg.get("SegmentSequence", []):
        if item.get("SegmentLabel") == label:
            return int(item.SegmentNumber)
    raise ValueError(f"the SEG has no segment labelled {label!r}")


def _frames(ref: SourceRef) -> list[int] | None:
    return [ref.frame_number] if ref.frame_number is not None else None


def _source_for_segmentation(ref: SourceRef) -> hd.sr.SourceImageForSegmentation:
    return hd.sr.SourceImageForSegmentation(ref.sop_class_uid, ref.sop_instance_uid, _frames(ref))


def _procedure(image: Image, source: Dataset) -> CodedConcept:
    body_parts = image.body_parts | normalise_body_part(
        source.get("BodyPartExamined"), source.get("StudyDescription"), source.get("SeriesDescription")
    )
    if image.modality == "CT" and "CHEST" in body_parts:
        return _CT_CHEST
    return _PROCEDURES.get(image.modality, _IMAGING_PROCEDURE)
