"""Load step, volumes (CT; MR/PT with slice geometry; enhanced multi-frame with per-frame geometry): slices
selected and sorted along the normal, series quality checks, HU after the Modality LUT."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from node.imaging.read import (
    ImageLoadError,
    Series,
    decode,
    floats,
    frame_count,
    header_attrs,
    instance_number,
    positive_pair,
    strings,
)
from plugins.base import Image, SourceRef

# Geometry tolerances.
ORIENTATION_TOLERANCE = 1e-3  # max difference of direction cosines for "the same orientation"
DUPLICATE_TOLERANCE_MM = 0.01  # slices closer than this along the normal share a position
GAP_FACTOR = 1.5  # a step larger than 1.5 x the median step is a gap (missing slices)
SPACING_TOLERANCE = 0.10  # non-gap steps further than 10 % from the median are "inconsistent"
SHEAR_TOLERANCE_DEG = 0.5  # slice offsets this far off the normal (and >= 0.5 mm in-plane) = tilt
SHEAR_TOLERANCE_MM = 0.5


@dataclass(frozen=True)
class SliceQuality:
    """What the slice positions of a volume say: step, missing positions and the quality warnings."""

    step_mm: float
    slice_count: int
    missing: int
    expected: int
    missing_percent: float
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class VolumeSample:
    """Evenly spaced slices of a volume: float32 (z, y, x) after the Modality LUT (HU for CT), the thickness
    of the slab each slice stands for (between its neighbours' midpoints) and the (y, x) pixel spacing."""

    pixels: np.ndarray
    slabs_mm: np.ndarray
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True)
class _Slice:
    """One 2-D plane of a volume: a single-frame instance or one frame of an enhanced instance."""

    ds: Dataset
    frame: int | None  # 0-based frame index in a multi-frame instance, None for a single-frame one
    position: np.ndarray  # ImagePositionPatient (3,)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None
    rescale: tuple[float, float] | None  # (slope, intercept) from functional groups; None: use the header
    localizer: bool
    instance_number: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.ds.Rows), int(self.ds.Columns)

    @property
    def source(self) -> SourceRef:
        return SourceRef(
            str(self.ds.SOPInstanceUID),
            str(self.ds.SOPClassUID),
            None if self.frame is None else self.frame + 1,
        )


@dataclass(frozen=True)
class _Volume:
    """Selected, sorted slices of a series with their geometry and warnings (pixels not decoded yet)."""

    slices: list[_Slice]
    keys: np.ndarray  # position of each slice along the normal (mm), ascending
    normal: np.ndarray
    quality: SliceQuality
    warnings: list[str]  # selection warnings and quality warnings, in that order


def quality_warnings(
    positions: np.ndarray | Sequence[Sequence[float]],
    normal: np.ndarray | Sequence[float],
    *,
    min_slices: int = 10,
    gantry_tilt: float = 0.0,
    nominal_step: float | None = None,
) -> SliceQuality:
    """Series quality checks on the ImagePositionPatient of each slice (any order; positions distinct).

    Checks missing slices (steps > 1.5 x the median step), inconsistent spacing (other steps more than
    10 % from the median), gantry tilt (a non-zero GantryDetectorTilt, or slice offsets not parallel to
    the normal) and too few slices. `nominal_step` (SpacingBetweenSlices or SliceThickness) is the step
    of a one-slice series. Raises ValueError when `positions` is empty or not (n, 3), or `normal` is zero.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) == 0:
        raise ValueError("positions must be a non-empty (n, 3) array")
    unit = np.asarray(normal, dtype=np.float64)
    if unit.shape != (3,) or not np.linalg.norm(unit) > 1e-6:
        raise ValueError("normal must be a non-zero 3-vector")
    unit = unit / np.linalg.norm(unit)
    keys = pos @ unit
    order = np.argsort(keys, kind="stable")
    pos, keys = pos[order], keys[order]
    n = len(keys)
    steps = np.diff(keys)
    median = float(np.median(steps)) if n >= 2 else 0.0
    step = median if median > 0 else (nominal_step if nominal_step and nominal_step > 0 else 1.0)
    gaps = steps > GAP_FACTOR * step if median > 0 else np.zeros(len(steps), dtype=bool)
    missing = int(sum(max(1, round(s / step) - 1) for s in steps[gaps]))
    expected = n + missing
    regular = steps[~gaps]
    uneven = regular[np.abs(regular - step) > SPACING_TOLERANCE * step]
    offset = pos[-1] - pos[0]
    along = float(offset @ unit)
    in_plane = float(np.linalg.norm(offset - along * unit))
    shear_deg = math.degrees(math.atan2(in_plane, abs(along))) if in_plane >= SHEAR_TOLERANCE_MM else 0.0

    warnings: list[str] = []
    if missing:
        warnings.append(
            f"missing slices: {missing} of {expected} expected positions ({100.0 * missing / expected:.1f}%)"
        )
    if len(uneven):
        warnings.append(
            f"inconsistent slice spacing: {len(uneven)} of {n - 1} steps differ by more than "
            f"{SPACING_TOLERANCE:.0%} from the median {step:.2f} mm "
            f"(range {min(uneven.min(), step):.2f}-{max(uneven.max(), step):.2f} mm)"
        )
    tilt_parts = []
    if abs(gantry_tilt) > 0.01:
        tilt_parts.append(f"GantryDetectorTilt {gantry_tilt:.1f} degrees")
    if shear_deg > SHEAR_TOLERANCE_DEG:
        tilt_parts.append(f"slice positions sheared {shear_deg:.1f} degrees off the slice normal")
    if tilt_parts:
        warnings.append("gantry tilt: " + "; ".join(tilt_parts))
    if n < min_slices:
        warnings.append(f"too few slices: {n} (minimum {min_slices})")
    return SliceQuality(
        step_mm=float(step),
        slice_count=n,
        missing=missing,
        expected=expected,
        missing_percent=round(100.0 * missing / expected, 2),
        warnings=tuple(warnings),
    )


def load_volume(series: Series, min_slices: int) -> Image:
    """The "volume" Image of a CT/MR/PT series: float32 (z, y, x) sorted along the slice normal.

    Raises ImageLoadError when no slice has position and orientation, the orientation cosines are not
    orthogonal, a multi-frame image has no per-frame geometry, or the pixel data cannot be decoded or is not
    one greyscale plane per slice.
    """
    volume = _select_volume(series, min_slices)
    pixels = _volume_pixels(volume.slices)
    first = volume.slices[0]
    spacing_yx = first.pixel_spacing
    all_warnings = list(volume.warnings)
    if spacing_yx is None:
        all_warnings.append("pixel spacing unknown")
        spacing_yx = (1.0, 1.0)
    row, col = first.orientation[:3], first.orientation[3:]
    attrs = header_attrs(first.ds)
    attrs["PixelSpacing"] = list(spacing_yx)
    if "SliceThickness" not in attrs and first.frame is not None:
        thickness = _functional(first.ds, first.frame, "PixelMeasuresSequence", "SliceThickness")
        if floats(thickness, 1):
            attrs["SliceThickness"] = float(thickness)
    attrs["slice_count"] = volume.quality.slice_count
    attrs["missing_slice_percent"] = volume.quality.missing_percent
    return Image(
        kind="volume",
        pixels=pixels,
        spacing=(volume.quality.step_mm, spacing_yx[0], spacing_yx[1]),
        sources=tuple(s.source for s in volume.slices),
        modality=series.modality,
        origin=_vec3(first.position),
        direction=(_vec3(row), _vec3(col), _vec3(volume.normal)),
        warnings=tuple(all_warnings),
        attrs=attrs,
    )


def sample_volume(series: Series, max_slices: int) -> VolumeSample:
    """At most `max_slices` (>= 1) evenly spaced slices of the series' volume, decoded, each with the slab it
    stands for, so that a volume estimate from them covers the whole series.

    Raises ImageLoadError for the same reasons as `load_volume`.
    """
    volume = _select_volume(series, min_slices=1)
    n = len(volume.slices)
    chosen = np.unique(np.round(np.linspace(0, n - 1, min(n, max_slices))).astype(int))
    keys = volume.keys[chosen]
    half = volume.quality.step_mm / 2.0
    bounds = np.concatenate(([keys[0] - half], (keys[1:] + keys[:-1]) / 2.0, [keys[-1] + half]))
    return VolumeSample(
        pixels=_volume_pixels([volume.slices[i] for i in chosen]),
        slabs_mm=np.diff(bounds),
        pixel_spacing=volume.slices[0].pixel_spacing or (1.0, 1.0),
    )


def _select_volume(series: Series, min_slices: int) -> _Volume:
    """Planes of all instances -> one orientation, one size, sorted along the normal, one per position."""
    warnings = list(series.warnings)
    slices: list[_Slice] = []
    no_geometry = 0
    for ds in series.datasets:
        planes = _planes(ds)
        if planes is None:
            no_geometry += 1
        else:
            slices.extend(planes)
    if not slices:
        raise ImageLoadError("no image has ImagePositionPatient and ImageOrientationPatient: cannot build a volume")
    if no_geometry:
        warnings.append(f"dropped {no_geometry} image(s) without ImagePositionPatient/ImageOrientationPatient")

    localizers = [s for s in slices if s.localizer]
    if localizers and len(localizers) < len(slices):
        slices = [s for s in slices if not s.localizer]
        warnings.append(f"dropped {len(localizers)} localizer image(s)")

    slices = sorted(slices, key=lambda s: s.instance_number)
    groups: list[list[_Slice]] = []
    for s in slices:
        for group in groups:
            if np.max(np.abs(group[0].orientation - s.orientation)) <= ORIENTATION_TOLERANCE:
                group.append(s)
                break
        else:
            groups.append([s])
    if len(groups) > 1:
        kept = max(groups, key=len)
        warnings.append(f"mixed orientations: kept {len(kept)} of {len(slices)} slices with the majority orientation")
        slices = kept

    sizes: dict[tuple[int, int], list[_Slice]] = {}
    for s in slices:
        sizes.setdefault(s.shape, []).append(s)
    if len(sizes) > 1:
        kept = max(sizes.values(), key=len)
        warnings.append(f"mixed image sizes: kept {len(kept)} of {len(slices)} slices with the majority size")
        slices = kept

    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise ImageLoadError("ImageOrientationPatient row and column cosines are not orthogonal unit vectors")
    normal = normal / norm
    slices = sorted(slices, key=lambda s: (float(s.position @ normal), s.instance_number))
    keys = np.array([float(s.position @ normal) for s in slices])
    keep = np.ones(len(slices), dtype=bool)  # a run of equal positions keeps its lowest InstanceNumber
    last = keys[0]
    for i in range(1, len(keys)):
        keep[i] = keys[i] - last > DUPLICATE_TOLERANCE_MM
        if keep[i]:
            last = keys[i]
    if not keep.all():
        warnings.append(f"duplicate slice positions: dropped {int((~keep).sum())} slice(s)")
        slices = [s for s, k in zip(slices, keep, strict=True) if k]
        keys = keys[keep]

    first = slices[0]
    nominal = None
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = floats(first.ds.get(keyword), 1)
        if value is None and first.frame is not None:
            value = floats(_functional(first.ds, first.frame, "PixelMeasuresSequence", keyword), 1)
        if value and value[0] > 0:
            nominal = value[0]
            break
    tilt = floats(first.ds.get("GantryDetectorTilt"), 1)
    quality = quality_warnings(
        np.array([s.position for s in slices]),
        normal,
        min_slices=min_slices,
        gantry_tilt=tilt[0] if tilt else 0.0,
        nominal_step=nominal,
    )
    return _Volume(slices, keys, normal, quality, warnings + list(quality.warnings))


def _planes(ds: Dataset) -> list[_Slice] | None:
    """The planes of one instance, or None when it has no geometry (a classic image without IPP/IOP).

    Raises ImageLoadError for a multi-frame instance without per-frame geometry.
    """
    n_frames = frame_count(ds)
    image_type = strings(ds.get("ImageType"))
    number = instance_number(ds)
    if n_frames <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        position = floats(ds.get("ImagePositionPatient"), 3)
        orientation = floats(ds.get("ImageOrientationPatient"), 6)
        if position is None or orientation is None:
            return None
        return [
            _Slice(
                ds=ds,
                frame=None,
                position=np.array(position),
                orientation=np.array(orientation),
                pixel_spacing=positive_pair(ds.get("PixelSpacing")),
                rescale=None,
                localizer="LOCALIZER" in image_type,
                instance_number=number,
            )
        ]
    modality = str(ds.get("Modality", "")).upper()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != n_frames:
        raise ImageLoadError(f"multi-frame {modality} without per-frame geometry (functional groups) is not supported")
    planes = []
    for frame in range(n_frames):
        position = floats(_functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orientation = floats(_functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        if position is None or orientation is None:
            raise ImageLoadError(
                f"multi-frame {modality} without per-frame geometry (functional groups) is not supported"
            )
        slope = floats(_functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"), 1)
        intercept = floats(_functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"), 1)
        frame_type: list[str] = []
        for seq in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence", "PETFrameTypeSequence"):
            frame_type = frame_type or strings(_functional(ds, frame, seq, "FrameType"))
        planes.append(
            _Slice(
                ds=ds,
                frame=frame,
                position=np.array(position),
                orientation=np.array(orientation),
                pixel_spacing=positive_pair(_functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing")),
                rescale=(slope[0], intercept[0]) if slope and intercept else None,
                localizer="LOCALIZER" in (frame_type or image_type),
                instance_number=number,
            )
        )
    return planes


def _vec3(values: np.ndarray) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _functional(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """A value from the frame's functional group `sequence`, else from the shared functional groups."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if not items or len(items) <= index:
            continue
        inner = items[index].get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].get(keyword)
    return None


def _volume_pixels(slices: list[_Slice]) -> np.ndarray:
    """Decode the slices into a float32 (z, y, x) array after the Modality LUT (HU for CT)."""
    rows, cols = slices[0].shape
    out = np.empty((len(slices), rows, cols), dtype=np.float32)
    multi_frame: dict[int, np.ndarray] = {}
    for i, s in enumerate(slices):
        if s.frame is None:
            raw = decode(s.ds)
        else:
            if id(s.ds) not in multi_frame:
                multi_frame[id(s.ds)] = decode(s.ds)
            frames = multi_frame[id(s.ds)]
            raw = frames[s.frame] if frames.ndim == 3 else frames
        if raw.shape != (rows, cols):
            raise ImageLoadError(
                f"slice pixel data has shape {raw.shape}, expected {rows}x{cols} greyscale: not a volume"
            )
        if s.rescale is not None:
            out[i] = raw.astype(np.float64) * s.rescale[0] + s.rescale[1]
        else:
            out[i] = apply_modality_lut(raw, s.ds)
    return out
