"""Encode step, heatmaps: each plugin heatmap -> RGB secondary captures of its key source images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from node.results.common import (
    Provenance,
    body_parts,
    complete_lossy_compression,
    set_laterality,
)
from node.results.seg import segment_colours
from plugins.base import Findings, Heatmap, Image

DISCLAIMER = "AI-generated - not for primary diagnosis"
HEAT_THRESHOLD = 0.05  # heatmap values below this are fully transparent
ALPHA_MAX = 0.6  # opacity of the colour at heatmap value 1; alpha is proportional to the value
LUNG_WINDOW = (-600.0, 1500.0)  # (centre, width) HU for chest CT without a window in its header
SOFT_TISSUE_WINDOW = (40.0, 400.0)

# A jet-like colour map: positions in [0, 1] and their RGB colours (0..1), interpolated linearly.
_LUT_AT = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_LUT_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])

# DCM 121322 "Source image for image processing operation": purpose of the SourceImageSequence item.
_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


def encode_sc(
    findings: Findings,
    image: Image,
    sources: Mapping[str, Dataset],
    prov: Provenance,
    source_series_uid: str,
    max_images: int = 3,
) -> list[Dataset]:
    """Secondary-capture heatmaps: for each heatmap, the key source image(s) with the heatmap blended in
    colour, a colour legend and "AI-generated - not for primary diagnosis" burned in. CT: one SC per
    selected slice, the max_images slices where the heatmap is strongest; X-ray: the single image; US: the
    frame(s) where it is strongest. Empty list when there are no heatmaps. Raises ValueError when a
    heatmap's shape disagrees with the image.

    `sources` maps SOP Instance UID -> the stored source dataset (headers suffice: pixels come from
    `image`). The strength of a slice/frame is the sum of its heatmap values; slices/frames whose heatmap
    is all zero are never chosen (an all-zero heatmap yields no SC). Output UIDs are derived from
    (source series, plugin, version, "SC", "<heatmap name>:<slice/frame index>").
    Also raises ValueError when max_images < 1 or a selected source is missing from `sources`.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    spatial = image.pixels.shape[:2] if image.kind == "image2d" else image.pixels.shape[:3]
    for heatmap in findings.heatmaps:
        if heatmap.values.shape != spatial:
            raise ValueError(f"heatmap {heatmap.name!r} has shape {heatmap.values.shape}, image has {spatial}")
    out: list[Dataset] = []
    for heatmap in findings.heatmaps:
        heat = np.clip(np.nan_to_num(heatmap.values.astype(np.float32)), 0.0, 1.0)
        for index in _strongest(heat, image.kind, max_images):
            ref = image.sources[index]
            ds = sources.get(ref.sop_instance_uid)
            if ds is None:
                raise ValueError(f"source instance of {image.kind} index {index} is not among the given sources")
            layer = heat if image.kind == "image2d" else heat[index]
            rgb = _render(_background(image, index, ds), layer, heatmap, prov)
            description = (
                f"Heatmap '{heatmap.name}' ({heatmap.quantity}) of {prov.manifest.name} {prov.manifest.version} "
                "blended in colour over the source image; colour bar and AI-generated notice in a band below it"
            )
            out.append(_sc(rgb, ds, image, index, heatmap.name, description, prov, source_series_uid, len(out) + 1))
    if findings.segmentations and "SEG" in prov.manifest.outputs and not _has_patient_geometry(image, sources):
        out += _outlines(findings, image, sources, prov, source_series_uid, max_images, len(out))
    return out


def _has_patient_geometry(image: Image, sources: Mapping[str, Dataset]) -> bool:
    """Whether the source images have a frame of reference, so that viewers can overlay a SEG on them."""
    first = sources.get(image.sources[0].sop_instance_uid) if image.sources else None
    return first is not None and "FrameOfReferenceUID" in first


def _outlines(findings: Findings, image: Image, sources: Mapping[str, Dataset], prov: Provenance,
              source_series_uid: str, max_images: int, first: int) -> list[Dataset]:
    """Mask outlines burned on the source frames, for sources without patient geometry (ultrasound, most
    X-ray): a PACS or viewer that cannot overlay the SEG shows these. The max_images frames with the largest
    segmented area; each segment in its SEG display colour, named in the band below the image."""
    specs = {s.label: s for s in prov.manifest.segments}
    ordered = [specs[seg.segment] for seg in findings.segmentations if seg.segment in specs]
    colours = dict(zip([s.label for s in ordered], segment_colours(ordered), strict=True))
    spatial = image.pixels.shape[:2] if image.kind == "image2d" else image.pixels.shape[:3]
    masks = [(seg.segment, np.asarray(seg.mask, dtype=bool)) for seg in findings.segmentations
             if seg.segment in colours and seg.mask.shape == spatial]
    if not masks:
        return []
    area = sum(m.astype(np.float32) for _, m in masks)
    out: list[Dataset] = []
    for index in _strongest(area, image.kind, max_images):
        ref = image.sources[index]
        ds = sources.get(ref.sop_instance_uid)
        if ds is None:
            raise ValueError(f"source instance of {image.kind} index {index} is not among the given sources")
        rgb = np.clip(np.round(_background(image, index, ds) * 255.0), 0, 255).astype(np.uint8)
        shown = []
        for label, mask in masks:
            layer = mask if image.kind == "image2d" else mask[index]
            if layer.any():
                rgb[_outline(layer)] = colours[label]
                shown.append(label)
        lines = [DISCLAIMER, f"{prov.manifest.name} {prov.manifest.version} - segmentation outline"]

        def legend(canvas: PILImage.Image, draw: ImageDraw.ImageDraw, y: int, margin: int, font,
                   shown: list[str] = shown) -> int:
            x = margin
            for label in shown:
                size = int(font.size)
                draw.rectangle((x, y, x + size, y + size), fill=colours[label], outline=(255, 255, 255))
                _text(draw, (x + size + margin, y), label, font)
                x += size + 2 * margin + int(draw.textlength(label, font=font)) + size
            return y + int(font.size * 1.25)

        description = (
            f"Outline of the segments ({', '.join(shown)}) found by {prov.manifest.name} {prov.manifest.version} "
            "burned on the source image; legend and AI-generated notice in a band below it"
        )[:1024]
        out.append(_sc(_with_band(rgb, lines, legend, extra_lines=1), ds, image, index, "outline", description,
                       prov, source_series_uid, first + len(out) + 1))
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a 2-D mask, about 1/200 of the image wide (at least 1 pixel)."""
    width = max(1, round(min(mask.shape) / 200))
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def _strongest(heat: np.ndarray, kind: str, count: int) -> list[int]:
    """Indices of the slices/frames with the largest heatmap sum (ties: lower index), in index order."""
    if kind == "image2d":
        return [0] if heat.any() else []
    sums = heat.reshape(heat.shape[0], -1).sum(axis=1, dtype=np.float64)
    order = np.argsort(-sums, kind="stable")[:count]
    return sorted(int(i) for i in order if sums[i] > 0)


def _background(image: Image, index: int, ds: Dataset) -> np.ndarray:
    """The source slice/image/frame as float RGB in [0, 1], (y, x, 3); CT windowed for display."""
    if image.kind == "volume":
        centre, width = _window(ds, image)
        grey = np.clip((image.pixels[index] - (centre - width / 2.0)) / width, 0.0, 1.0)
    elif image.kind == "image2d":
        grey = np.clip(image.pixels, 0.0, 1.0)
    else:
        frame = image.pixels[index].astype(np.float32) / 255.0
        if frame.ndim == 3:
            return frame
        grey = frame
    return np.repeat(grey[..., np.newaxis], 3, axis=-1).astype(np.float32)


def _window(ds: Dataset, image: Image) -> tuple[float, float]:
    """(centre, width) in HU: the slice's first window, else a lung window for chest, else soft tissue."""
    try:
        c, w = float(_first(ds.get("WindowCenter"))), float(_first(ds.get("WindowWidth")))
    except (TypeError, ValueError, IndexError):
        c, w = float("nan"), float("nan")
    if np.isfinite(c) and np.isfinite(w) and w >= 1.0:
        return c, w
    return LUNG_WINDOW if "CHEST" in image.body_parts else SOFT_TISSUE_WINDOW


def _first(value: Any) -> Any:
    """The first value of a multi-valued element, or the value itself."""
    return value[0] if isinstance(value, MultiValue | list | tuple) else value


def _colour(values: np.ndarray) -> np.ndarray:
    """The colour map applied to values in [0, 1]: float RGB (..., 3)."""
    return np.stack([np.interp(values, _LUT_AT, _LUT_RGB[:, c]) for c in range(3)], axis=-1)


def _render(background: np.ndarray, heat: np.ndarray, heatmap: Heatmap, prov: Provenance) -> np.ndarray:
    """Blend the heatmap over the background, then add a band below the image with the AI notice, the model,
    and a colour bar labelled with the heatmap's quantity and unit: RGB uint8, (h + band, w, 3). The band is
    outside the source image, so it never covers text the scanner burned in."""
    alpha = np.where(heat >= HEAT_THRESHOLD, ALPHA_MAX * heat, 0.0)[..., np.newaxis]
    blended = (1.0 - alpha) * background + alpha * _colour(heat)
    rgb = np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)
    top = "100 %" if heatmap.unit == "%" else "1"
    quantity = f"{heatmap.quantity} ({'%' if heatmap.unit == '%' else 'no unit'})"
    lines = [DISCLAIMER, f"{prov.manifest.name} {prov.manifest.version} - heatmap: {heatmap.name}", quantity]

    def legend(canvas: PILImage.Image, draw: ImageDraw.ImageDraw, y: int, margin: int, font) -> int:
        width = canvas.width - 2 * margin
        bar_h = max(6, int(font.size))
        ramp = np.round(_colour(np.linspace(0.0, 1.0, width)) * 255.0).astype(np.uint8)
        canvas.paste(PILImage.fromarray(np.repeat(ramp[np.newaxis], bar_h, axis=0), mode="RGB"), (margin, y))
        draw.rectangle((margin - 1, y - 1, margin + width, y + bar_h), outline=(255, 255, 255))
        y += bar_h + max(2, bar_h // 4)
        _text(draw, (margin, y), "0", font)
        _text(draw, (margin + width - int(draw.textlength(top, font=font)), y), top, font)
        return y + int(font.size * 1.25)

    return _with_band(rgb, lines, legend, extra_lines=2)


def _with_band(rgb: np.ndarray, lines: list[str], legend, extra_lines: int = 0) -> np.ndarray:
    """`rgb` with a black band below it holding `lines` (white, outlined) and what `legend(canvas, draw, y,
    margin, font)` draws after them (`extra_lines` lines high); the band is as tall as its content."""
    h, w = rgb.shape[:2]
    margin = max(3, min(h, w) // 64)
    probe = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    font = _font(probe, lines, max(11, min(h, w) // 36), w - 2 * margin)
    step = int(font.size * 1.25)
    band = 2 * margin + step * (len(lines) + extra_lines) + margin
    canvas = PILImage.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(PILImage.fromarray(rgb, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + margin
    for line in lines:
        _text(draw, (margin, y), line, font)
        y += step
    legend(canvas, draw, y, margin, font)
    return np.asarray(canvas, dtype=np.uint8)


def _font(draw: ImageDraw.ImageDraw, lines: list[str], size: int, max_width: int) -> ImageFont.FreeTypeFont:
    """The built-in font at `size` px, smaller while the widest line does not fit `max_width` (>= 8 px)."""
    while True:
        font = ImageFont.load_default(size=size)
        if size <= 8 or max(draw.textlength(line, font=font) for line in lines) <= max_width:
            return font
        size -= 1


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.FreeTypeFont) -> None:
    """White text with a black outline: legible on any background."""
    stroke = max(1, int(font.size) // 16)
    draw.text(xy, text, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0))


def _sc(
    rgb: np.ndarray,
    ds: Dataset,
    image: Image,
    index: int,
    key: str,
    description: str,
    prov: Provenance,
    source_series_uid: str,
    instance_number: int,
) -> Dataset:
    """One SCImage in the source's patient/study, with our provenance and a reference to its source."""
    pixel_spacing = None
    if image.kind == "volume" and len(image.spacing) == 3:
        pixel_spacing = (float(image.spacing[1]), float(image.spacing[2]))
    orientation = _patient_orientation(image, ds)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ds,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        **prov.identity("SC", source_series_uid, ds, f"{key}:{index}"),
        instance_number=instance_number,
        pixel_spacing=pixel_spacing,
        # highdicom requires an orientation for PATIENT; an unknown one is emptied below (Type 2)
        patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=prov.series_description("SC", ds),
    )
    if orientation is None:
        sc.PatientOrientation = None
    set_laterality(sc, ds, body_parts(image, prov), unknown="empty")
    sc.BurnedInAnnotation = "YES"
    prov.add_contributing_equipment(sc)  # after the source's acquisition equipment that highdicom adds
    complete_lossy_compression(sc, [ds])
    sc.DerivationDescription = description
    ref = image.sources[index]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = ref.frame_number
    item.PurposeOfReferenceCodeSequence = [_PURPOSE]
    sc.SourceImageSequence = [item]
    return sc


def _patient_orientation(image: Image, ds: Dataset) -> tuple[str, str] | None:
    """Row and column directions as patient letters: from the CT geometry, else the source's
    PatientOrientation when it is two single letters; None when unknown."""
    if image.kind == "volume" and image.direction is not None:
        return _letter(image.direction[0]), _letter(image.direction[1])
    value = ds.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        letters = (str(value[0]), str(value[1]))
        if all(v in {"A", "P", "R", "L", "H", "F"} for v in letters):
            return letters
    return None


def _letter(direction: tuple[float, float, float]) -> str:
    """The patient direction (LPS) a unit vector points along most: L/R, P/A or H/F."""
    axis = int(np.argmax(np.abs(direction)))
    positive = direction[axis] > 0
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]
