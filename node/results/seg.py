"""Encode step, SEG: the findings' masks as a binary DICOM Segmentation aligned with the source images."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

from node.results.common import (
    Provenance,
    body_parts,
    coded,
    complete_lossy_compression,
    declare_private_schemes,
    drop_incomplete_references,
    set_laterality,
    source_header,
)
from plugins.base import Findings, Image, SegmentSpec

# CID 7162 "Surface Processing Algorithm Families": (123110, DCM, "Artificial Intelligence").
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence

# Recommended display colour per segmented property type (SNOMED CT code -> sRGB), written as
# RecommendedDisplayCIELabValue. Paired organs get clearly different colours (left blue, right amber), findings
# warm colours. A type not listed takes the first colour of FALLBACK_COLOURS, from the position its code hashes
# to, that no earlier segment of the same SEG uses: stable per type, distinct within a SEG.
SEGMENT_COLOURS: dict[tuple[str, str], tuple[int, int, int]] = {
    ("SCT", "39607008"): (197, 165, 145),  # Lung
    ("SCT", "44029006"): (70, 130, 255),  # Left lung
    ("SCT", "3341006"): (255, 190, 60),  # Right lung
    ("SCT", "87433001"): (230, 40, 40),  # Pulmonary emphysema
    ("SCT", "41216001"): (0, 200, 120),  # Prostate
    ("SCT", "10200004"): (221, 130, 101),  # Liver
    ("SCT", "78961009"): (157, 108, 162),  # Spleen
    ("SCT", "9846003"): (255, 150, 40),  # Right kidney
    ("SCT", "18639004"): (60, 160, 255),  # Left kidney
    ("SCT", "28231008"): (139, 150, 98),  # Gallbladder
    ("SCT", "32849002"): (211, 171, 143),  # Esophagus
    ("SCT", "69695003"): (216, 132, 105),  # Stomach
    ("SCT", "15825003"): (224, 97, 76),  # Aorta
    ("SCT", "64131007"): (0, 151, 206),  # Inferior vena cava
    ("SCT", "110765007"): (0, 112, 165),  # Portal vein and splenic vein
    ("SCT", "15776009"): (249, 180, 111),  # Pancreas
    ("SCT", "29392005"): (255, 220, 100),  # Right adrenal gland
    ("SCT", "12003004"): (100, 200, 255),  # Left adrenal gland
    ("SCT", "272673000"): (241, 214, 145),  # Bone
}
FALLBACK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip


def segment_colours(specs: list[SegmentSpec]) -> list[tuple[int, int, int]]:
    """The display colour (sRGB) of each segment, in order: SEGMENT_COLOURS by type, else a fallback colour
    not yet used in this list."""
    used: list[tuple[int, int, int]] = []
    for spec in specs:
        colour = SEGMENT_COLOURS.get((spec.type.scheme, spec.type.value))
        if colour is None or colour in used:
            start = zlib.crc32(f"{spec.type.scheme}:{spec.type.value}".encode()) % len(FALLBACK_COLOURS)
            ring = FALLBACK_COLOURS[start:] + FALLBACK_COLOURS[:start]
            colour = next((c for c in ring if c not in used), ring[0])
        used.append(colour)
    return used


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
    ordered = [specs[seg.segment] for seg in findings.segmentations]
    descriptions = [
        _description(numbers[spec.label], spec, algorithm, colour)
        for spec, colour in zip(ordered, segment_colours(ordered), strict=True)
    ]
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
        **prov.identity("SEG", source_series_uid, source_images[0]),
        instance_number=1,
        content_description=prov.series_description("SEG", source_images[0]),
        omit_empty_frames=bool(stacked.any()) and not spread,  # all empty: keep the frames, never write none
    )
    if spread:
        _spread_over_frames(seg, stacked, str(single.SOPInstanceUID))
    seg.SeriesDescription = prov.series_description("SEG", source_images[0])
    seg.ContentCreatorName = None  # Type 2: created by an algorithm (Contributing Equipment), not by a person
    prov.add_contributing_equipment(seg)
    complete_lossy_compression(seg, [sources[uid] for uid in dict.fromkeys(s.sop_instance_uid for s in image.sources)])
    drop_incomplete_references(seg)
    declare_private_schemes(seg)
    set_laterality(seg, sources[image.sources[0].sop_instance_uid], body_parts(image, prov), unknown="absent")
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
    number: int, spec: SegmentSpec, algorithm: hd.AlgorithmIdentificationSequence, colour: tuple[int, int, int]
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        display_color=hd.color.CIELabColor.from_rgb(*colour),
        segment_number=number,
        segment_label=spec.label,
        segmented_property_category=coded(spec.category),
        segmented_property_type=coded(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
