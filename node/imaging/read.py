"""Load step, reading: the instances of one series -> checked headers, their modality, decoded pixels and the
header helpers the volume, 2-D and frames loaders share."""

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

log = logging.getLogger("node.imaging")

VOLUME_MODALITIES = frozenset({"CT", "MR", "PT"})
IMAGE2D_MODALITIES = frozenset({"CR", "DX", "MG", "OT", "SC"})
FRAMES_MODALITIES = frozenset({"US"})
SUPPORTED_MODALITIES = VOLUME_MODALITIES | IMAGE2D_MODALITIES | FRAMES_MODALITIES

# Non-identifying header values copied into Image.attrs (never patient, physician or accession data).
ATTR_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
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


class ImageLoadError(ValueError):
    """The series cannot be turned into a plugin input; the message says why (no PHI)."""


@dataclass(frozen=True)
class Series:
    """The image instances of one series (headers read, pixel data deferred), their one supported modality
    and the warnings reading gave."""

    datasets: list[Dataset]
    modality: str
    warnings: list[str]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].get("SeriesInstanceUID", ""))


def read_series(paths: Sequence[Path]) -> Series:
    """Read the headers (pixel data deferred) of one series' instances and keep those with pixel data.

    Raises ImageLoadError when no path is given, a file is not readable DICOM, the files hold more than one
    series or modality, no instance has pixel data, an image lacks SOP class/instance UID, Rows or Columns,
    or the modality is absent or not supported.
    """
    if not paths:
        raise ImageLoadError("no instances given")
    datasets: list[Dataset] = []
    for number, path in enumerate(paths, start=1):
        try:
            ds = dcmread(path, defer_size="64 KB")
        except Exception as exc:  # any reader failure means "not readable DICOM": convert at this boundary
            log.warning("instance %d of %d is not readable DICOM", number, len(paths), exc_info=True)
            raise ImageLoadError(
                f"instance {number} of {len(paths)} is not a readable DICOM file ({reason(exc)})"
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
    return Series(images, _modality(images), warnings)


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


def decode(ds: Dataset) -> np.ndarray:
    """Decoded pixel data of one instance (colour as RGB). Raises ImageLoadError naming the syntax."""
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise anything (RuntimeError, ValueError, ...): convert here
        syntax = _transfer_syntax(ds)
        log.warning("cannot decode pixel data (%s)", syntax, exc_info=True)
        raise ImageLoadError(f"cannot decode the pixel data ({syntax}): {reason(exc)}") from exc


def _transfer_syntax(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid else "unknown transfer syntax"


def reason(exc: BaseException) -> str:
    """A short PHI-free reason: no paths (OSError messages carry file names), one line, bounded."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def floats(value: Any, count: int) -> tuple[float, ...] | None:
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


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames of an instance, 1 when absent or malformed."""
    frames = floats(ds.get("NumberOfFrames"), 1)
    return int(frames[0]) if frames else 1


def positive_pair(value: Any) -> tuple[float, float] | None:
    """Two positive floats (a PixelSpacing), or None."""
    pair = floats(value, 2)
    return (pair[0], pair[1]) if pair and pair[0] > 0 and pair[1] > 0 else None


def strings(value: Any) -> list[str]:
    """A CS value as upper-case strings, whether pydicom gives one value or several."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip().upper() for v in items]


def instance_number(ds: Dataset) -> int:
    """InstanceNumber for sorting; instances without one sort last."""
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return 2**31


def header_attrs(ds: Dataset) -> dict[str, Any]:
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
