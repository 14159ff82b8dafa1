"""Encode step, SEG: the findings' masks as a binary DICOM Segmentation aligned with the source images."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

from node.results.common import (
    Provenance,
    coded,
    declare_private_schemes,
    drop_incomplete_references,
    series_number,
    source_header,
)
from plugins.base import Findings, Image, SegmentSpec

# CID 7162 "Surface Processing Algorithm Families": (123110, DCM, "Artificial Intelligence").
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence


def segment_numbers(findings: Findings) -> dict[str, int]:
    """SegmentNumber of each segment label in the SEG encoded from `findings` (1, 2, ... in findings order)."""
    return {seg.segment: number for number, seg in enumerate(findings.segmentations, start=1)}


def encode_seg(
    findings: Findings,
    image: Image,
    sources: Mapping[str, Dataset],
    prov: Provenance,
    source_series_uid: str,
) -> Dataset | None:
    """Binary DICOM Segmentation of the findings' masks on the source images, or None when there are no
    segmentations. `sources` maps SOPInstanceUID -> the source dataset (full, with pixels) for every
    entry of image.sources. Raises ValueError when masks and image disagree.

    Frame i of the mask belongs to `image.sources[i]` (a CT slice, a US frame; the one X-ray image for
    "image2d"); highdicom takes each frame's plane position and source reference from that source, and
    frames without any mask pixel are left out. Segment numbers follow `segment_numbers(findings)`.
    """
    if not findings.segmentations:
        return None
    specs = {s.label: s for s in prov.manifest.segments}
    numbers = segment_numbers(findings)
    if len(numbers) != len(findings.segmentations):
        raise ValueError("findings hold more than one mask for the same segment")
    spatial = image.pixels.shape[:2] if image.kind == "image2d" else image.pixels.shape[:3]
    masks = []
    for seg in findings.segmentations:
        if seg.segment not in specs:
            raise ValueError(f"segment {seg.segment!r} is not declared in the manifest of {prov.manifest.name}")
        if seg.mask.shape != spatial:
            raise ValueError(f"mask for {seg.segment!r} has shape {seg.mask.shape}, image has {spatial}")
        masks.append(np.asarray(seg.mask).astype(bool))
    # (y, x, s) or (n, y, x, s), laid out segment-major: highdicom's overlap check sums over the segment
    # axis and takes each segment's frames, both about twice as fast on this layout as on np.stack(axis=-1)
    stacked = np.moveaxis(np.stack(masks, axis=0), 0, -1)
    if image.kind == "image2d":
        stacked = stacked[np.newaxis]
    source_images = _source_images(image, sources, stacked.shape[0])
    rows, columns = stacked.shape[1:3]
    for ds in source_images:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise ValueError(f"masks are {rows}x{columns}, a source image is {ds.Rows}x{ds.Columns}")
    manifest = prov.manifest
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name, family=ALGORITHM_FAMILY, version=manifest.version, source=prov.manufacturer
    )
    descriptions = [_description(numbers[seg.segment], specs[seg.segment], algorithm) for seg in findings.segmentations]
    # highdicom (0.28) takes several frames only with a frame of reference; an ordinary US cine has none:
    # encode its first covered frame, then repeat that frame's functional groups for the other frames.
    spread = (
        len(source_images) == 1
        and source_images[0].SOPClassUID == UltrasoundMultiFrameImageStorage
        and _frames(source_images[0]) > 1
        and "FrameOfReferenceUID" not in source_images[0]
    )
    if spread:
        covered = np.flatnonzero(stacked.any(axis=(1, 2, 3)))
        first = int(covered[0]) if covered.size else 0
        single = _header(source_images[0])
        single.SOPClassUID = UltrasoundImageStorage  # the single-frame view of the US multi-frame source
        del single.NumberOfFrames
        source_images, pixel_array = [single], stacked[first : first + 1]
    else:
        pixel_array = stacked
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=prov.uid(source_series_uid, "SEG", "series"),
        series_number=series_number(manifest.name, "SEG"),
        sop_instance_uid=prov.uid(source_series_uid, "SEG", 0),
        instance_number=1,
        manufacturer=prov.manufacturer,
        manufacturer_model_name=prov.model_name,
        software_versions=prov.software_versions,
        device_serial_number=prov.device_serial_number,
        content_description=prov.series_description("SEG"),
        omit_empty_frames=bool(stacked.any()) and not spread,  # all empty: keep the frames, never write none
    )
    if spread:
        _spread_over_frames(seg, stacked, str(single.SOPInstanceUID))
    seg.SeriesDescription = prov.series_description("SEG")
    drop_incomplete_references(seg)
    declare_private_schemes(seg)
    if "FrameOfReferenceUID" not in seg:  # General Image: Patient Orientation (Type 2C) without a frame of reference
        seg.PatientOrientation = source_images[0].get("PatientOrientation", "")
    if prov.institution_name:
        seg.InstitutionName = prov.institution_name
    return seg


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _spread_over_frames(seg: hd.seg.Segmentation, stacked: np.ndarray, source_uid: str) -> None:
    """Rewrite a SEG encoded on one frame of a multi-frame source without a frame of reference so that it
    holds, for every source frame k and segment j with mask pixels, one frame referencing source frame k
    (Derivation Image > Source Image > Referenced Frame Number). Segment-level content stays highdicom's."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    template = {
        int(
            (item if "SegmentIdentificationSequence" in item else shared)
            .SegmentIdentificationSequence[0]
            .ReferencedSegmentNumber
        ): item
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    items, planes = [], []
    for k in range(stacked.shape[0]):
        for j in range(stacked.shape[-1]):
            if not stacked[k, ..., j].any() and stacked.any():
                continue
            item = copy.deepcopy(template[j + 1])
            item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber = k + 1
            items.append(item)
            planes.append(stacked[k, ..., j])
    seg.PerFrameFunctionalGroupsSequence = items
    seg.NumberOfFrames = len(items)
    seg.PixelData = pack_bits(np.stack(planes).astype(np.uint8))
    _set_source_class(seg, source_uid, UltrasoundMultiFrameImageStorage)


def _set_source_class(ds: Dataset, source_uid: str, sop_class_uid: str) -> None:
    """Every reference to `source_uid` in `ds` (at any depth) names `sop_class_uid`."""
    for element in ds:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if item.get("ReferencedSOPInstanceUID") == source_uid:
                item.ReferencedSOPClassUID = sop_class_uid
            _set_source_class(item, source_uid, sop_class_uid)


def _header(source: Dataset, sequences: bool = True) -> Dataset:
    """The source's header made valid for highdicom (see source_header), a zero or malformed Pixel
    Spacing also left out."""
    header = source_header(source, sequences=sequences)
    spacing = header.get("PixelSpacing")
    if "PixelSpacing" in header and not (spacing and len(spacing) == 2 and all(float(v) > 0 for v in spacing)):
        del header.PixelSpacing
    return header


def _source_images(image: Image, sources: Mapping[str, Dataset], n_frames: int) -> list[Dataset]:
    """The source datasets in mask-frame order, as highdicom takes them: single-frame images one per mask
    frame, or one multi-frame image whose frames 1..n are the mask frames. Raises ValueError."""
    if len(image.sources) != n_frames:
        raise ValueError(f"masks have {n_frames} frame(s), the image has {len(image.sources)} source(s)")
    missing = [s.sop_instance_uid for s in image.sources if s.sop_instance_uid not in sources]
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) of the image were not given")
    uids = list(dict.fromkeys(s.sop_instance_uid for s in image.sources))
    # highdicom copies the patient/study modules from the first source only; of the others it reads the
    # identity and plane geometry, so their (often long) sequences are not copied
    datasets = [_header(sources[uid], sequences=i == 0) for i, uid in enumerate(uids)]
    multi_frame = [ds for ds in datasets if int(ds.get("NumberOfFrames") or 1) > 1]
    if not multi_frame:
        if len(uids) != n_frames:
            raise ValueError("the image lists the same single-frame source instance more than once")
        return datasets
    if len(datasets) > 1:
        raise ValueError("a SEG over several instances must have single-frame sources (got a multi-frame one)")
    frames = [s.frame_number for s in image.sources]
    if frames != list(range(1, int(datasets[0].NumberOfFrames) + 1)):
        raise ValueError("the image's frames must be all frames of the multi-frame source, in order")
    return datasets


def _description(
    number: int, spec: SegmentSpec, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.label,
        segmented_property_category=coded(spec.category),
        segmented_property_type=coded(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
