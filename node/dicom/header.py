"""The header of a received instance: UID checks (before any UID touches a path) and the attributes that
tracking and routing need, parsed without pixels."""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# The top-level elements `read_header` decodes: every other element up to the pixel data is only stepped over by
# its length (so a broken structure is still found), and reading stops at the pixel data.
HEADER_TAGS = [Tag(t) for t in (
    0x00080005,  # SpecificCharacterSet: decodes the texts below
    0x00080008,  # ImageType
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x00080070,  # Manufacturer
    0x00081030,  # StudyDescription
    0x0008103E,  # SeriesDescription
    0x00180015,  # BodyPartExamined
    0x00180050,  # SliceThickness
    0x00181030,  # ProtocolName
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00200012,  # AcquisitionNumber
    0x00201002,  # ImagesInAcquisition
    0x00280008,  # NumberOfFrames
    0x00400275,  # RequestAttributesSequence
    0x00401003,  # RequestedProcedurePriority
)]
_PIXELS = Tag(0x7FE00008)  # Float Pixel Data; Double Float Pixel Data and Pixel Data follow


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= _PIXELS


class HeaderError(ValueError):
    """Base class: the bytes are not a DICOM instance radnode can accept."""


class InvalidUID(HeaderError):
    """A UID is missing or not a valid DICOM UID; it never reaches a path."""


class UndecodableDataset(HeaderError):
    """The received bytes are not a DICOM dataset we can read a header from."""


def is_valid_uid(uid: object) -> bool:
    """True for a DICOM UID: digits and dots, no empty component, at most 64 characters."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and UID_RE.match(uid) is not None


def check_uid(uid: object, what: str) -> str:
    """Return `uid` when it is a valid UID. Raises InvalidUID naming `what` otherwise."""
    if not is_valid_uid(uid):
        raise InvalidUID(f"{what} is not a valid UID")
    return str(uid)


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The attributes of a received instance that tracking and routing need (no patient data)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    study_description: str | None
    series_description: str | None
    protocol_name: str | None
    manufacturer: str | None
    slice_thickness: float | None
    image_type: str | None
    series_number: int | None
    number_of_frames: int | None
    requested_priority: str | None = None
    acquisition_number: int | None = None
    images_in_acquisition: int | None = None


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional attribute must not reject the instance
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):  # ImageType, BodyPartExamined with VM > 1
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit] or None


def _number(ds: Dataset, keyword: str, kind: type) -> float | int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else kind(value)
    except Exception:
        return None


def read_header(source: bytes | Path) -> InstanceHeader:
    """Parse the header of an encoded DICOM file (bytes with file meta, or a path): the file meta and the
    `HEADER_TAGS` only, never the pixels (the other elements are stepped over, not decoded).

    Raises UndecodableDataset when the bytes cannot be parsed, InvalidUID when a required UID
    (study, series, SOP instance, SOP class) is missing or malformed.
    """
    try:
        if isinstance(source, bytes):
            ds = read_partial(BytesIO(source), stop_when=_at_pixels, specific_tags=HEADER_TAGS)
        else:
            with open(source, "rb") as f:
                ds = read_partial(f, stop_when=_at_pixels, specific_tags=HEADER_TAGS)
        # Touch the required elements now so lazy decoding errors surface here.
        study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        sop, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
        tsyntax = ds.file_meta.get("TransferSyntaxUID")
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, NotImplementedError) as exc:
        raise UndecodableDataset(f"cannot decode dataset: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises a wide range of errors on broken streams
        raise UndecodableDataset(f"cannot decode dataset: {type(exc).__name__}") from exc
    return InstanceHeader(
        study_uid=check_uid(study, "StudyInstanceUID"),
        series_uid=check_uid(series, "SeriesInstanceUID"),
        sop_instance_uid=check_uid(sop, "SOPInstanceUID"),
        sop_class_uid=check_uid(sop_class, "SOPClassUID"),
        transfer_syntax_uid=check_uid(tsyntax, "TransferSyntaxUID"),
        modality=_text(ds, "Modality", 16),
        body_part_examined=_text(ds, "BodyPartExamined", 64),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        manufacturer=_text(ds, "Manufacturer"),
        slice_thickness=_number(ds, "SliceThickness", float),
        image_type=_text(ds, "ImageType"),
        series_number=_number(ds, "SeriesNumber", int),
        number_of_frames=_number(ds, "NumberOfFrames", int),
        requested_priority=_requested_priority(ds),
        acquisition_number=_number(ds, "AcquisitionNumber", int),
        images_in_acquisition=_positive(_number(ds, "ImagesInAcquisition", int)),
    )


def _positive(value: int | float | None) -> int | None:
    return int(value) if value is not None and 0 < value < 2**31 else None


def _requested_priority(ds: Dataset) -> str | None:
    """RequestedProcedurePriority (STAT, HIGH, ROUTINE, MEDIUM, LOW), at the top level or in the first
    item of the Request Attributes Sequence where modalities copy the order's attributes."""
    value = _text(ds, "RequestedProcedurePriority", 16)
    if value is None:
        try:
            items = ds.get("RequestAttributesSequence") or []
            value = _text(items[0], "RequestedProcedurePriority", 16) if len(items) else None
        except Exception:  # a malformed optional sequence must not reject the instance
            value = None
    return value.upper() if value else None
