"""Encode step, SR: a plugin's Findings as a Comprehensive 3D SR, TID 1500 Measurement Report (highdicom)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage
from scipy.spatial import ConvexHull

from node.results.common import (
    Provenance,
    coded,
    declare_private_schemes,
    derive_uid,
    drop_incomplete_references,
    source_header,
    walk_items,
)
from plugins.base import Findings, Image, Measurement, SourceRef

# Procedure reported (TID 1500 row 4, CID 100 "Quantitative Diagnostic Imaging Procedures"): LOINC
# "<modality> unspecified body region" for CT, MR, PET and NM, SCT 363679005 "Imaging procedure" for anything
# else. CID 100 has no chest-CT code; LOINC 43468-8 "XR unspecified body region" was added to it after the
# edition the PixelMed validator checks against, so X-ray reports the general code too.
_PROCEDURES: dict[str, CodedConcept] = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": CodedConcept("49118-3", "LN", "NM unspecified body region"),
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

    def tracking(key: str, label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=prov.uid(source_series_uid, "SR", f"tracking:{key}"), identifier=label)

    # Every measurement group carries an image region, as viewers that draw SR annotations (OHIF) require
    # (a group without one stops OHIF's SR viewport): a segment's outline on its key slice, or, for what has no
    # location of its own (a classification, a whole-series measurement), the border of the image it was made
    # on (the middle slice/frame of a series).
    groups: list = []
    whole_image = _border_region(image)
    for c in findings.classifications:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"finding:{c.concept.scheme}:{c.concept.value}", c.concept.meaning),
                referenced_region=whole_image,
                finding_type=coded(c.concept),
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name=manifest.name, version=manifest.version, parameters=[f"threshold={c.threshold:g}"]
                ),
                measurements=[hd.sr.Measurement(name=PROBABILITY, value=c.probability, unit=_unit("1"))],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(coded(c.concept), PRESENT if c.positive else ABSENT)
                ],
            )
        )

    specs = {s.label: s for s in manifest.segments}
    masks = {s.segment: np.asarray(s.mask, dtype=bool) for s in findings.segmentations}
    in_seg = set(masks) if seg is not None else set()
    labels = [s.segment for s in findings.segmentations]
    labels += [m.segment for m in findings.measurements if m.segment is not None and m.segment not in labels]
    labels = list(dict.fromkeys(labels))
    for label in labels:
        if label not in specs:
            raise ValueError(f"segment {label!r} is not declared in the manifest of {manifest.name}")
        spec = specs[label]
        measured = [_measurement(m) for m in findings.measurements if m.segment == label and m.frame is None]
        if not measured and _per_frame(findings, label):
            continue  # its measurements are per frame (below)
        finding = dict(finding_type=coded(spec.type), finding_category=coded(spec.category), algorithm_id=algorithm)
        ident = tracking(f"segment:{label}", label)
        region = _key_region(masks[label], image) if label in masks else None
        if label in in_seg:
            # the measurements with the SEG segment (TID 1411; also for 2-D: TID 1410's "Referenced Segmentation
            # Frame" as highdicom writes it carries both ReferencedFrameNumber and ReferencedSegmentNumber, which
            # dciodvfy rejects), and beside it, under the same tracking identifier and UID (the same finding),
            # the segment's outline on its key slice: viewers merge the two into one annotation with the values;
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=_segment_number(seg, label),
                source_images=[_source_for_segmentation(s) for s in image.sources],
            )
            # the outline first: OHIF 3.13 draws a merged finding only when its first group has the region
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=ident, referenced_region=region or whole_image, **finding))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=ident, referenced_segment=ref, measurements=measured or None, **finding))
        else:
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=ident, referenced_region=region or whole_image, measurements=measured or None,
                **finding))

    # per-frame measurements (an ultrasound frame's area): one group per (segment, frame), its region the
    # segment's outline on that frame when there is a mask there, else the frame's border
    per_frame: dict[tuple[str | None, int], list] = {}
    for m in findings.measurements:
        if m.frame is not None:
            per_frame.setdefault((m.segment, m.frame), []).append(_measurement(m))
    for (label, k), items in sorted(per_frame.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        ref = image.sources[k]
        extra = {} if label is None else {"finding_type": coded(specs[label].type),
                                          "finding_category": coded(specs[label].category)}
        region = None
        if label in masks:
            region = _region(masks[label] if image.kind == "image2d" else masks[label][k], ref)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(f"frame:{label or 'image'}:{k}",
                                         f"{label or _series_word(image)}, {_unit_word(image)} {k + 1}"),
            referenced_region=region or _border_region(image, k), algorithm_id=algorithm, measurements=items,
            **extra))
    whole = [_measurement(m) for m in findings.measurements if m.segment is None and m.frame is None]
    if whole or not groups:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("image", _series_word(image)),
                referenced_region=whole_image,
                algorithm_id=algorithm,
                measurements=whole or None,
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
        observation_context=context, procedure_reported=_procedure(image), imaging_measurements=groups
    )
    _insert_image_library(report, evidence)
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
        **prov.identity("SR", source_series_uid, evidence[0]),
        instance_number=1,
        series_description=prov.series_description("SR", evidence[0]),
        # a revision (the series got new instances after the earlier result) names the SR it supersedes
        previous_versions=[p.as_dataset() for p in prov.predecessors if p.kind == "SR"] or None,
        # complete and final as the algorithm's output; unverified: no person has checked it
        is_complete=True,
        is_final=True,
        is_verified=False,
    )
    drop_incomplete_references(sr)
    declare_private_schemes(sr)
    _standard_meanings(sr)
    prov.add_contributing_equipment(sr)
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


def _procedure(image: Image) -> CodedConcept:
    return _PROCEDURES.get(image.modality, _IMAGING_PROCEDURE)


# Code meanings as PS3.16 spells them where highdicom capitalises differently (validators compare them).
_MEANINGS = {("121233", "DCM"): "Source image for segmentation"}


def _standard_meanings(ds: Dataset) -> None:
    for item in walk_items(ds):
        meaning = _MEANINGS.get((str(item.get("CodeValue")), str(item.get("CodingSchemeDesignator"))))
        if meaning is not None:
            item.CodeMeaning = meaning


def _per_frame(findings: Findings, label: str) -> bool:
    return any(m.segment == label and m.frame is not None for m in findings.measurements)


def _series_word(image: Image) -> str:
    """What a group of measurements of the whole input is about, by image kind."""
    return {"volume": "whole series", "image2d": "whole image", "frames": "all frames"}[image.kind]


def _unit_word(image: Image) -> str:
    return {"volume": "slice", "image2d": "image", "frames": "frame"}[image.kind]


def _key_region(mask: np.ndarray, image: Image) -> hd.sr.ImageRegion | None:
    """Where a mask is on the image, for a planar annotation: its outline on its key slice/frame (the one where
    it is largest); None for an empty mask."""
    k = 0
    if image.kind != "image2d":
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        if not areas.any():
            return None
        k = int(np.argmax(areas))
    return _region(mask if image.kind == "image2d" else mask[k], image.sources[k])


def _border_region(image: Image, index: int | None = None) -> hd.sr.ImageRegion:
    """The border of a whole image (the middle slice/frame of a series unless `index` is given): the region of
    a finding or measurement made on the whole input."""
    k = 0 if image.kind == "image2d" else (len(image.sources) // 2 if index is None else index)
    rows, columns = image.pixels.shape[:2] if image.kind == "image2d" else image.pixels.shape[1:3]
    corners = np.array([(0, 0), (columns, 0), (columns, rows), (0, rows), (0, 0)], dtype=np.float32)
    return _polyline(corners, image.sources[k])


def _region(mask2d: np.ndarray, ref: SourceRef) -> hd.sr.ImageRegion | None:
    """The outline of a 2-D mask (see outline_polyline) on the source image (frame); None for an empty mask."""
    points = outline_polyline(mask2d)
    return None if points is None else _polyline(points, ref)


def _polyline(points: np.ndarray, ref: SourceRef) -> hd.sr.ImageRegion:
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(ref.sop_class_uid, ref.sop_instance_uid, _frames(ref)),
    )


# Moore neighbourhood, clockwise from north: (row, column) offsets.
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def outline_polyline(mask2d: np.ndarray, max_points: int = 256) -> np.ndarray | None:
    """The outline of a 2-D mask as SCOORD graphic data: (column, row) image coordinates (0.0, 0.0 is the
    top-left corner of the top-left pixel), closed (last point = first), at most `max_points` points.

    One part (parts under a tenth of the largest one's area are ignored): its boundary (holes filled), traced
    clockwise by Moore-neighbour tracing through the boundary pixels' centres; a part too small to trace (one
    pixel, one line) gives its pixels' bounding rectangle. Several parts (two lungs, scattered lesions): the
    convex hull around them. None when the mask is empty."""
    labels, count = ndimage.label(mask2d)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(mask2d, labels, range(1, count + 1))
    parts = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    if len(parts) > 1:
        return _hull(np.isin(labels, parts), max_points)
    component = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    padded = np.pad(component, 1)
    rows, cols = np.nonzero(padded)
    start = (int(rows[0]), int(cols[0]))  # first in raster order: its west neighbour is background
    path = [start]
    current, back = start, 6
    for _ in range(4 * int(component.sum()) + 8):
        for step in range(8):
            d = (back + step) % 8
            r, c = current[0] + _RING[d][0], current[1] + _RING[d][1]
            if padded[r, c]:
                before = _RING[(back + step - 1) % 8]
                back = _RING.index((current[0] + before[0] - r, current[1] + before[1] - c))
                current = (r, c)
                break
        else:
            break  # a single pixel
        if current == start:
            break
        path.append(current)
    if len(path) < 3:
        r0, c0 = rows.min() - 1, cols.min() - 1
        r1, c1 = rows.max(), cols.max()  # -1 for the padding, +1 for the far edge
        corners = [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]
        return np.asarray(corners, dtype=np.float32)
    stride = max(1, -(-len(path) // (max_points - 1)))
    kept = path[::stride]
    points = [(c - 1 + 0.5, r - 1 + 0.5) for r, c in kept]
    points.append(points[0])
    return np.asarray(points, dtype=np.float32)


def _hull(mask2d: np.ndarray, max_points: int) -> np.ndarray:
    """The convex hull of a mask's pixel centres, clockwise on the image, closed."""
    rows, cols = np.nonzero(mask2d ^ ndimage.binary_erosion(mask2d))  # boundary pixels suffice for the hull
    points = np.column_stack([cols + 0.5, rows + 0.5]).astype(np.float64)
    hull = points[ConvexHull(points).vertices]  # counter-clockwise in (x, y) = clockwise on the image (y down)
    stride = max(1, -(-len(hull) // (max_points - 1)))
    hull = hull[::stride]
    return np.vstack([hull, hull[:1]]).astype(np.float32)


def _insert_image_library(report: hd.sr.MeasurementReport, evidence: list[Dataset]) -> None:
    """TID 1600 Image Library with an entry for every source image, before the Imaging Measurements (TID 1500
    row order). highdicom's descriptors need attributes some sources lack (X-ray orientation, spacing); such an
    image gets an entry without descriptors rather than none."""
    images = [ds for ds in evidence if ds.SOPClassUID not in _NON_IMAGES]
    if not images:
        return
    try:
        library = hd.sr.ImageLibrary(images)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        container = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        group.ContentSequence = hd.sr.ContentSequence([
            hd.sr.ImageContentItem(
                name=CodedConcept("260753009", "SCT", "Source"),
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for ds in images
        ])
        container.ContentSequence = hd.sr.ContentSequence([group])
        library = [container]
    content = report[0].ContentSequence
    at = next(i for i, item in enumerate(content) if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    for offset, item in enumerate(library):
        content.insert(at + offset, item)


# SEG and SR sources are not images: no Image Library entry.
_NON_IMAGES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}
)
