"""Load step, ultrasound frames (US): uint8 (n, y, x) grey or (n, y, x, 3) RGB, one source per frame, the pixel
spacing from the Sequence of Ultrasound Regions."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.imaging.display import GREYSCALE, rgb_pixels
from node.imaging.read import ImageLoadError, Series, decode, frame_count, header_attrs, instance_number
from plugins.base import Image, SourceRef

_REGION_KEYWORDS = (
    "RegionSpatialFormat", "RegionDataType", "RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1",
    "RegionLocationMaxY1", "PhysicalUnitsXDirection", "PhysicalUnitsYDirection", "PhysicalDeltaX", "PhysicalDeltaY",
)  # fmt: skip


def load_frames(series: Series) -> Image:
    """The "frames" Image of the series' instances in InstanceNumber order (instances whose frames differ in
    size or colour from the first are skipped with a warning).

    Raises ImageLoadError when pixel data cannot be decoded or has an unexpected layout.
    """
    warnings = list(series.warnings)
    ordered = sorted(series.datasets, key=instance_number)
    stacks: list[np.ndarray] = []
    sources: list[SourceRef] = []
    skipped = 0
    for ds in ordered:
        frames = _frames_uint8(ds)
        if stacks and frames.shape[1:] != stacks[0].shape[1:]:
            skipped += 1
            continue
        stacks.append(frames)
        sop = (str(ds.SOPInstanceUID), str(ds.SOPClassUID))
        if "NumberOfFrames" in ds:  # a multi-frame instance (even of one frame): frames are referenced by number
            sources.extend(SourceRef(sop[0], sop[1], k) for k in range(1, len(frames) + 1))
        else:  # a single-frame US image: referenced as a whole (no Referenced Frame Number)
            sources.append(SourceRef(sop[0], sop[1], None))
    if skipped:
        warnings.append(f"skipped {skipped} instance(s) whose frames differ in size or colour from the first")
    first = ordered[0]
    pixels = np.ascontiguousarray(np.concatenate(stacks, axis=0))
    regions = _ultrasound_regions(first)
    spacing = _ultrasound_spacing(regions, pixels.shape[1], pixels.shape[2], warnings)
    calibrated = spacing is not None
    if spacing is None:
        warnings.append("pixel spacing unknown")
        spacing = (1.0, 1.0)
    attrs = header_attrs(first)
    attrs["PixelSpacing"] = list(spacing)
    attrs["calibrated"] = calibrated
    attrs["SequenceOfUltrasoundRegions"] = regions
    attrs["frame_count"] = int(pixels.shape[0])
    return Image(
        kind="frames",
        pixels=pixels,
        spacing=spacing,
        sources=tuple(sources),
        modality=series.modality,
        warnings=tuple(warnings),
        attrs=attrs,
    )


def _frames_uint8(ds: Dataset) -> np.ndarray:
    """(n, y, x) grey or (n, y, x, 3) RGB uint8 frames of one instance."""
    raw = decode(ds)
    n_frames = frame_count(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in GREYSCALE:
        grey = raw if n_frames > 1 else raw[np.newaxis]
        if grey.ndim != 3:
            raise ImageLoadError(f"greyscale ultrasound pixel data has an unexpected shape {raw.shape}")
        out = _to_uint8(grey, int(ds.get("BitsStored", 8)))
        return 255 - out if photometric == "MONOCHROME1" else out
    rgb, depth = rgb_pixels(raw, ds, photometric)
    rgb = rgb if n_frames > 1 else rgb[np.newaxis]
    if rgb.ndim != 4:
        raise ImageLoadError(f"colour ultrasound pixel data has an unexpected shape {raw.shape}")
    return _to_uint8(rgb, depth)


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype == np.uint8 and bits <= 8:
        return values
    top = float(2**bits - 1)
    return np.clip(np.round(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _ultrasound_regions(ds: Dataset) -> list[dict[str, Any]]:
    """The Sequence of Ultrasound Regions as plain dicts keyed by keyword (numbers only)."""
    out = []
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        item = {}
        for keyword in _REGION_KEYWORDS:
            value = region.get(keyword)
            if value is not None:
                item[keyword] = float(value) if keyword.startswith("PhysicalDelta") else int(value)
        out.append(item)
    return out


def _ultrasound_spacing(regions: list[dict[str, Any]], rows: int, cols: int,
                        warnings: list[str]) -> tuple[float, float] | None:
    """(y, x) mm from the first 2-D region in centimetres that fits the frame; a region that lies outside
    the frame (calibration written for another matrix size) is not trusted and said so."""
    for region in regions:
        if region.get("RegionSpatialFormat") != 1:
            continue
        if region.get("PhysicalUnitsXDirection") != 3 or region.get("PhysicalUnitsYDirection") != 3:
            continue
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        if not (dx and dy and dx > 0 and dy > 0):
            continue
        # vendors write the last pixel or one past it: allow one pixel over the edge
        if region.get("RegionLocationMaxX1", 0) > cols or region.get("RegionLocationMaxY1", 0) > rows:
            warnings.append(
                f"ultrasound calibration region ({region.get('RegionLocationMaxX1')} x "
                f"{region.get('RegionLocationMaxY1')}) lies outside the {cols} x {rows} frame: not used"
            )
            continue
        return float(dy) * 10.0, float(dx) * 10.0
    return None
