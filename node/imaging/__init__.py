"""Load step (plugin input and the router's lung check): one stored series -> `plugins.base.Image`.

`load_image` reads the instances of ONE series and builds what a plugin receives:

- "volume" (CT; MR/PT slices with ImagePositionPatient/ImageOrientationPatient; enhanced multi-frame with
  per-frame geometry): float32 (z, y, x) after the Modality LUT (HU for CT), slices sorted by position
  along the slice normal, series quality checks in `Image.warnings`;
- "image2d" (CR, DX, MG, OT/SC): float32 (y, x) in [0, 1] for display: Modality LUT, then VOI LUT or
  window (lowest and highest output of the VOI map to 0 and 1; without a VOI the data range is used),
  MONOCHROME1 inverted so that high = bright; colour images become luminance;
- "frames" (US): uint8 (n, y, x) grey or (n, y, x, 3) RGB, one source per frame.

`check_lungs` / `check_lungs_in_files` look for air-filled lungs inside the body of a CT: the router runs
the cheap file variant before any chest-CT model. Errors are `ImageLoadError` with a PHI-free message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from node.logs import uid_hash
from plugins.base import Image, SourceRef
from plugins.lungs import internal_air

log = logging.getLogger(__name__)

VOLUME_MODALITIES = frozenset({"CT", "MR", "PT"})
IMAGE2D_MODALITIES = frozenset({"CR", "DX", "MG", "OT", "SC"})
FRAMES_MODALITIES = frozenset({"US"})
SUPPORTED_MODALITIES = VOLUME_MODALITIES | IMAGE2D_MODALITIES | FRAMES_MODALITIES

# Non-identifying header values copied into Image.attrs (never patient, physician or accession data).
ATTR_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SliceThickness",
    "ConvolutionKernel",
    "KVP",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "PixelSpacing",
    "BodyPartExamined",
    "ImageType",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns")

# Geometry tolerances.
ORIENTATION_TOLERANCE = 1e-3  # max difference of direction cosines for "the same orientation"
DUPLICATE_TOLERANCE_MM = 0.01  # slices closer than this along the normal share a position
GAP_FACTOR = 1.5  # a step larger than 1.5 x the median step is a gap (missing slices)
SPACING_TOLERANCE = 0.10  # non-gap steps further than 10 % from the median are "inconsistent"
SHEAR_TOLERANCE_DEG = 0.5  # slice offsets this far off the normal (and >= 0.5 mm in-plane) = tilt
SHEAR_TOLERANCE_MM = 0.5

# Lung check (plugins/lungs.py). A body is HU > -500; air is HU < -400 (lung parenchyma is about -850 HU).
# Adult lungs hold 2.5-6 l of air at CT and a small child's still about 0.5 l; the whole air inside a
# head (paranasal sinuses, mastoids, nasal cavity, pharynx) stays well below 150 ml. LUNG_MIN_ML = 300 ml
# separates the two with margin on both sides, and a chest scan that covers only part of the lungs passes.


class ImageLoadError(ValueError):
    """The series cannot be turned into a plugin input; the message says why (no PHI)."""


@dataclass(frozen=True)
class LungCheck:
    """Result of the CT lung check: found when the internal air volume reaches LUNG_MIN_ML."""

    found: bool
    volume_ml: float
    reason: str


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


# --- public entry points ---------------------------------------------------------------------------


def load_image(paths: Sequence[Path], *, min_slices: int = 10) -> Image:
    """Read the stored instances of ONE series and build the plugin input, with quality warnings.

    Raises ImageLoadError when a file is not readable DICOM, the files hold more than one series or
    modality, no instance has pixel data, an image lacks SOP class/instance UID, Rows or Columns, the
    modality is not supported, no CT/MR/PT slice has position and orientation, a multi-frame image has no
    per-frame geometry, or the pixel data cannot be decoded (the message names the transfer syntax).
    """
    datasets, warnings = _read_series(paths)
    modality = _modality(datasets)
    series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    if modality in VOLUME_MODALITIES:
        image = _load_volume(datasets, modality, warnings, min_slices)
    elif modality in IMAGE2D_MODALITIES:
        image = _load_image2d(datasets, modality, warnings)
    else:
        image = _load_frames(datasets, modality, warnings)
    log.debug(
        "series %s loaded: %s %s %s, %d warning(s)",
        uid_hash(series_uid),
        modality,
        image.kind,
        image.pixels.shape,
        len(image.warnings),
    )
    return image


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


def check_lungs(image: Image) -> LungCheck:
    """CT pixel check: air-filled lungs inside the body (used before any chest-CT model runs).

    Body = largest connected region of HU > -500 in each slice, holes filled; internal air = HU < -400
    inside it (air connected to the outside in the slice plane is excluded), pockets under 1 ml removed.
    Found when that volume is at least LUNG_MIN_ML (300 ml). An image that is not a CT volume is
    reported as not found. Raises nothing.
    """
    if image.kind != "volume" or image.modality != "CT":
        return LungCheck(False, 0.0, f"not a CT volume ({image.modality} {image.kind})")
    dz, dy, dx = (float(s) for s in image.spacing)
    slabs = np.full(image.pixels.shape[0], dz)
    return _lung_check(image.pixels, dy * dx, slabs)


def check_lungs_in_files(paths: Sequence[Path], max_slices: int = 24) -> LungCheck:
    """Same check reading only an evenly spaced subset of at most max_slices slices (and it may downsample
    in-plane 2x) so the router can run it cheaply in the node process.

    Each sampled slice stands for the slab between it and its neighbours' midpoints, so the volume
    estimate covers the whole series. A series that is not CT is reported as not found.
    Raises ImageLoadError for the same reasons as `load_image`, and ValueError when max_slices < 1.
    """
    if max_slices < 1:
        raise ValueError("max_slices must be at least 1")
    datasets, warnings = _read_series(paths)
    modality = _modality(datasets)
    if modality != "CT":
        return LungCheck(False, 0.0, f"not a CT series (modality {modality})")
    volume = _select_volume(datasets, warnings, min_slices=1)
    n = len(volume.slices)
    chosen = np.unique(np.round(np.linspace(0, n - 1, min(n, max_slices))).astype(int))
    keys = volume.keys[chosen]
    half = volume.quality.step_mm / 2.0
    bounds = np.concatenate(([keys[0] - half], (keys[1:] + keys[:-1]) / 2.0, [keys[-1] + half]))
    slabs = np.diff(bounds)
    hu = _volume_pixels([volume.slices[i] for i in chosen])
    dy, dx = volume.slices[0].pixel_spacing or (1.0, 1.0)
    if hu.shape[1] >= 256 and hu.shape[2] >= 256:
        rows, cols = hu.shape[1] // 2 * 2, hu.shape[2] // 2 * 2
        hu = hu[:, :rows, :cols].reshape(len(hu), rows // 2, 2, cols // 2, 2).mean(axis=(2, 4))
        dy, dx = 2 * dy, 2 * dx
    return _lung_check(hu, dy * dx, slabs)


# --- reading --------------------------------------------------------------------------------------


def _read_series(paths: Sequence[Path]) -> tuple[list[Dataset], list[str]]:
    """Read headers (pixel data deferred) of one series' instances; keep those with pixel data."""
    if not paths:
        raise ImageLoadError("no instances given")
    datasets: list[Dataset] = []
    for number, path in enumerate(paths, start=1):
        try:
            ds = dcmread(path, defer_size="64 KB")
        except Exception as exc:  # any reader failure means "not readable DICOM": convert at this boundary
            log.warning("instance %d of %d is not readable DICOM", number, len(paths), exc_info=True)
            raise ImageLoadError(
                f"instance {number} of {len(paths)} is not a readable DICOM file ({_reason(exc)})"
            ) from exc
        datasets.append(ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise ImageLoadError(f"the instances belong to {len(series)} different series; load one series at a time")
    images = [ds for ds in datasets if any(k in ds for k in _PIXEL_KEYWORDS)]
    if not images:
        raise ImageLoadError("the series has no image instances (no pixel data)")
    for ds in images:
        absent = [k for k in _REQUIRED_KEYWORDS if ds.get(k) in (None, "")]
        if absent:
            raise ImageLoadError(f"an image instance has no {', '.join(absent)}")
    warnings = []
    if len(images) < len(datasets):
        warnings.append(f"skipped {len(datasets) - len(images)} non-image instance(s) (no pixel data)")
    return images, warnings


def _modality(datasets: list[Dataset]) -> str:
    modalities = sorted({str(ds.get("Modality", "") or "").strip().upper() for ds in datasets})
    if len(modalities) > 1:
        raise ImageLoadError(f"mixed modalities in one series: {', '.join(m or '(none)' for m in modalities)}")
    modality = modalities[0]
    if not modality:
        raise ImageLoadError("the instances have no Modality")
    if modality not in SUPPORTED_MODALITIES:
        raise ImageLoadError(
            f"modality {modality} is not supported (supported: {', '.join(sorted(SUPPORTED_MODALITIES))})"
        )
    return modality


def _decode(ds: Dataset) -> np.ndarray:
    """Decoded pixel data of one instance (colour as RGB). Raises ImageLoadError naming the syntax."""
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise anything (RuntimeError, ValueError, ...): convert here
        syntax = _transfer_syntax(ds)
        log.warning("cannot decode pixel data (%s)", syntax, exc_info=True)
        raise ImageLoadError(f"cannot decode the pixel data ({syntax}): {_reason(exc)}") from exc


def _transfer_syntax(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid else "unknown transfer syntax"


def _reason(exc: BaseException) -> str:
    """A short PHI-free reason: no paths (OSError messages carry file names), one line, bounded."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """`count` finite floats from a (multi-)value, or None when absent or malformed."""
    if value is None or value == "":
        return None
    try:
        items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(out) != count or not all(math.isfinite(v) for v in out):
        return None
    return out


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return 2**31


def _attrs(ds: Dataset) -> dict[str, Any]:
    """ATTR_KEYWORDS values of `ds` as plain JSON-able Python values (empty ones left out)."""
    attrs: dict[str, Any] = {}
    for keyword in ATTR_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, (MultiValue, list, tuple)):
            attrs[keyword] = [_plain(v) for v in value]
        else:
            attrs[keyword] = _plain(value)
    if "ImageType" in attrs and not isinstance(attrs["ImageType"], list):
        attrs["ImageType"] = [attrs["ImageType"]]
    return attrs


def _plain(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value).strip()


# --- volumes ----------------------------------------------------------------------------------------


def _load_volume(datasets: list[Dataset], modality: str, warnings: list[str], min_slices: int) -> Image:
    volume = _select_volume(datasets, warnings, min_slices)
    pixels = _volume_pixels(volume.slices)
    first = volume.slices[0]
    spacing_yx = first.pixel_spacing
    all_warnings = list(volume.warnings)
    if spacing_yx is None:
        all_warnings.append("pixel spacing unknown")
        spacing_yx = (1.0, 1.0)
    row, col = first.orientation[:3], first.orientation[3:]
    attrs = _attrs(first.ds)
    attrs["PixelSpacing"] = list(spacing_yx)
    if "SliceThickness" not in attrs and first.frame is not None:
        thickness = _functional(first.ds, first.frame, "PixelMeasuresSequence", "SliceThickness")
        if _floats(thickness, 1):
            attrs["SliceThickness"] = float(thickness)
    attrs["slice_count"] = volume.quality.slice_count
    attrs["missing_slice_percent"] = volume.quality.missing_percent
    return Image(
        kind="volume",
        pixels=pixels,
        spacing=(volume.quality.step_mm, spacing_yx[0], spacing_yx[1]),
        sources=tuple(s.source for s in volume.slices),
        modality=modality,
        origin=_vec3(first.position),
        direction=(_vec3(row), _vec3(col), _vec3(volume.normal)),
        warnings=tuple(all_warnings),
        attrs=attrs,
    )


def _select_volume(datasets: list[Dataset], warnings: list[str], min_slices: int) -> _Volume:
    """Planes of all instances -> one orientation, one size, sorted along the normal, one per position."""
    warnings = list(warnings)
    slices: list[_Slice] = []
    no_geometry = 0
    for ds in datasets:
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
        value = _floats(first.ds.get(keyword), 1)
        if value is None and first.frame is not None:
            value = _floats(_functional(first.ds, first.frame, "PixelMeasuresSequence", keyword), 1)
        if value and value[0] > 0:
            nominal = value[0]
            break
    tilt = _floats(first.ds.get("GantryDetectorTilt"), 1)
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
    frames = _floats(ds.get("NumberOfFrames"), 1)
    n_frames = int(frames[0]) if frames else 1
    image_type = _strings(ds.get("ImageType"))
    number = _instance_number(ds)
    if n_frames <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        position = _floats(ds.get("ImagePositionPatient"), 3)
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        if position is None or orientation is None:
            return None
        return [
            _Slice(
                ds=ds,
                frame=None,
                position=np.array(position),
                orientation=np.array(orientation),
                pixel_spacing=_positive_pair(ds.get("PixelSpacing")),
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
        position = _floats(_functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orientation = _floats(_functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        if position is None or orientation is None:
            raise ImageLoadError(
                f"multi-frame {modality} without per-frame geometry (functional groups) is not supported"
            )
        slope = _floats(_functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"), 1)
        intercept = _floats(_functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"), 1)
        frame_type: list[str] = []
        for seq in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence", "PETFrameTypeSequence"):
            frame_type = frame_type or _strings(_functional(ds, frame, seq, "FrameType"))
        planes.append(
            _Slice(
                ds=ds,
                frame=frame,
                position=np.array(position),
                orientation=np.array(orientation),
                pixel_spacing=_positive_pair(_functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing")),
                rescale=(slope[0], intercept[0]) if slope and intercept else None,
                localizer="LOCALIZER" in (frame_type or image_type),
                instance_number=number,
            )
        )
    return planes


def _vec3(values: np.ndarray) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _strings(value: Any) -> list[str]:
    """A CS value as upper-case strings, whether pydicom gives one value or several."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip().upper() for v in items]


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


def _positive_pair(value: Any) -> tuple[float, float] | None:
    pair = _floats(value, 2)
    return (pair[0], pair[1]) if pair and pair[0] > 0 and pair[1] > 0 else None


def _volume_pixels(slices: list[_Slice]) -> np.ndarray:
    """Decode the slices into a float32 (z, y, x) array after the Modality LUT (HU for CT)."""
    rows, cols = slices[0].shape
    out = np.empty((len(slices), rows, cols), dtype=np.float32)
    multi_frame: dict[int, np.ndarray] = {}
    for i, s in enumerate(slices):
        if s.frame is None:
            raw = _decode(s.ds)
        else:
            if id(s.ds) not in multi_frame:
                multi_frame[id(s.ds)] = _decode(s.ds)
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


# --- 2-D images ---------------------------------------------------------------------------------------


def _load_image2d(datasets: list[Dataset], modality: str, warnings: list[str]) -> Image:
    warnings = list(warnings)
    ordered = sorted(datasets, key=_instance_number)
    ds = ordered[0]
    if len(ordered) > 1:
        warnings.append(f"series has {len(ordered)} images; used the first by InstanceNumber")
    frames = _floats(ds.get("NumberOfFrames"), 1)
    if frames and frames[0] > 1:
        raise ImageLoadError(f"multi-frame {modality} images are not supported as a 2-D image")
    if str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING":
        warnings.append("image is FOR PROCESSING (raw detector data, not for presentation)")
    raw = _decode(ds)
    pixels = _display(raw, ds)
    spacing = _positive_pair(ds.get("PixelSpacing")) or _positive_pair(ds.get("ImagerPixelSpacing"))
    if spacing is None:
        warnings.append("pixel spacing unknown")
        spacing = (1.0, 1.0)
    attrs = _attrs(ds)
    attrs["PixelSpacing"] = list(spacing)
    return Image(
        kind="image2d",
        pixels=pixels,
        spacing=spacing,
        sources=(SourceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID)),),
        modality=modality,
        warnings=tuple(warnings),
        attrs=attrs,
    )


def _display(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Display-ready float32 (y, x) in [0, 1], high = bright. Raises ImageLoadError for odd layouts."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if raw.ndim != 2:
            raise ImageLoadError(f"greyscale pixel data has shape {raw.shape}, expected one 2-D image")
        values = apply_modality_lut(raw, ds)
        low, high = _voi_range(ds)
        if low is None or high is None:  # no VOI: the data range is the display range
            low, high = float(np.min(values)), float(np.max(values))
        else:
            if ds.get("VOILUTSequence") and values.dtype.kind == "f":  # a LUT is indexed by integers
                values = np.rint(values).astype(np.int64)
            try:
                values = apply_voi_lut(values, ds, index=0)
            except (ValueError, NotImplementedError) as exc:  # pydicom's errors for invalid VOI values
                raise ImageLoadError(f"cannot apply the VOI LUT or window: {_reason(exc)}") from exc
        scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low) if high > low else np.zeros(raw.shape)
        scaled = np.clip(scaled, 0.0, 1.0)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
        return scaled.astype(np.float32)
    rgb, depth = _rgb(raw, ds, photometric)
    if rgb.ndim != 3:
        raise ImageLoadError(f"colour pixel data has shape {rgb.shape}, expected one 2-D image")
    luminance = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(luminance / (2**depth - 1), 0.0, 1.0).astype(np.float32)


def _voi_range(ds: Dataset) -> tuple[float | None, float | None]:
    """Lowest and highest output of the VOI transform pydicom applies (apply_voi_lut), or (None, None)."""
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None, None
    modality_lut = ds.get("ModalityLUTSequence")
    bits = int(ds.get("BitsStored", 16))
    if modality_lut:
        low, high = 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = _floats(ds.get("RescaleSlope"), 1)
    intercept = _floats(ds.get("RescaleIntercept"), 1)
    if slope and intercept:
        low, high = low * slope[0] + intercept[0], high * slope[0] + intercept[0]
    return min(low, high), max(low, high)


def _rgb(raw: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, int]:
    """RGB pixels (pydicom already converts YBR_FULL/YBR_FULL_422; J2K decoders YBR_ICT/RCT) + bit depth."""
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(raw, ds)
        except Exception as exc:  # malformed palettes raise ValueError, KeyError, ...: convert here
            log.warning("cannot apply the palette colour lookup table", exc_info=True)
            raise ImageLoadError(f"cannot apply the palette colour lookup table: {_reason(exc)}") from exc
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        depth = int(descriptor[2]) if descriptor else 8
        return rgb, 8 if depth <= 8 else 16
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") and raw.shape[-1] == 3:
        return raw, int(ds.get("BitsStored", 8))
    raise ImageLoadError(f"photometric interpretation {photometric or '(none)'} is not supported")


# --- ultrasound frames -------------------------------------------------------------------------------


def _load_frames(datasets: list[Dataset], modality: str, warnings: list[str]) -> Image:
    warnings = list(warnings)
    ordered = sorted(datasets, key=_instance_number)
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
    attrs = _attrs(first)
    attrs["PixelSpacing"] = list(spacing)
    attrs["calibrated"] = calibrated
    attrs["SequenceOfUltrasoundRegions"] = regions
    attrs["frame_count"] = int(pixels.shape[0])
    return Image(
        kind="frames",
        pixels=pixels,
        spacing=spacing,
        sources=tuple(sources),
        modality=modality,
        warnings=tuple(warnings),
        attrs=attrs,
    )


def _frames_uint8(ds: Dataset) -> np.ndarray:
    """(n, y, x) grey or (n, y, x, 3) RGB uint8 frames of one instance."""
    raw = _decode(ds)
    frames_value = _floats(ds.get("NumberOfFrames"), 1)
    n_frames = int(frames_value[0]) if frames_value else 1
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = raw if n_frames > 1 else raw[np.newaxis]
        if grey.ndim != 3:
            raise ImageLoadError(f"greyscale ultrasound pixel data has an unexpected shape {raw.shape}")
        out = _to_uint8(grey, int(ds.get("BitsStored", 8)))
        return 255 - out if photometric == "MONOCHROME1" else out
    rgb, depth = _rgb(raw, ds, photometric)
    rgb = rgb if n_frames > 1 else rgb[np.newaxis]
    if rgb.ndim != 4:
        raise ImageLoadError(f"colour ultrasound pixel data has an unexpected shape {raw.shape}")
    return _to_uint8(rgb, depth)


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype == np.uint8 and bits <= 8:
        return values
    top = float(2**bits - 1)
    return np.clip(np.round(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


_REGION_KEYWORDS = (
    "RegionSpatialFormat", "RegionDataType", "RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1",
    "RegionLocationMaxY1", "PhysicalUnitsXDirection", "PhysicalUnitsYDirection", "PhysicalDeltaX", "PhysicalDeltaY",
)  # fmt: skip


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


# --- lung check -------------------------------------------------------------------------------------


def _lung_check(hu: np.ndarray, pixel_area_mm2: float, slabs_mm: np.ndarray) -> LungCheck:
    """Internal air volume of a HU stack whose slice i stands for a slab of `slabs_mm[i]` mm."""
    found = internal_air(hu, pixel_area_mm2 * np.asarray(slabs_mm, dtype=float) / 1000.0)
    volume_ml = found.volume_ml
    if found.lungs:
        return LungCheck(True, volume_ml, f"air-filled lungs found ({volume_ml:.0f} ml)")
    return LungCheck(False, volume_ml, f"no air-filled lungs inside the body ({volume_ml:.0f} ml of internal air)")
