"""The header of a received instance: UID checks (before any UID touches a path) and the attributes that
tracking and routing need, parsed without pixels."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

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


# --- the receivers' header reader: finds the HEADER_TAGS in the bytes, pydicom decodes their values ----------

_WANTED = frozenset(int(t) for t in HEADER_TAGS)
_VRS = frozenset(v.encode() for v in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()))
_LONG_VRS = frozenset(v.encode() for v in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 4-byte lengths
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 32
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _Unsure(Exception):
    """Something the fast reader does not walk itself: pydicom reads the data set instead."""


def _element(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value position) of the little-endian element header at `pos`."""
    if pos + 8 > len(data):
        raise _Unsure
    group, number = _TAG.unpack_from(data, pos)
    if implicit or group == 0xFFFE:  # item and delimitation tags carry no VR in any encoding
        return group << 16 | number, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = data[pos + 4:pos + 6]
    if vr not in _VRS:
        raise _Unsure
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Unsure
        return group << 16 | number, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    return group << 16 | number, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8


def _skip_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """The position after the Sequence Delimitation Item of the undefined-length value that starts at `pos`
    (sequence items, or encapsulated pixel data fragments)."""
    if depth > _MAX_DEPTH:
        raise _Unsure
    while True:
        tag, _, length, pos = _element(data, pos, True)
        if tag == _SEQUENCE_END and length == 0:
            return pos
        if tag != _ITEM:
            raise _Unsure
        if length != _UNDEFINED:
            if pos + length > len(data):
                raise _Unsure
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the Item Delimitation Item
            tag, vr, length, pos = _element(data, pos, implicit)
            if tag == _ITEM_END and length == 0:
                break
            if tag >> 16 == 0xFFFE:
                raise _Unsure
            pos = _skip_value(data, pos, vr, length, implicit, depth + 1)


def _skip_value(data: bytes, pos: int, vr: bytes | None, length: int, implicit: bool, depth: int) -> int:
    if length != _UNDEFINED:
        if pos + length > len(data):
            raise _Unsure
        return pos + length
    if not implicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
        raise _Unsure
    return _skip_sequence(data, pos, implicit or vr == b"UN", depth)  # UN of undefined length: implicit VR within


class _Found(dict):
    """keyword -> value of the elements _fast_dataset found, read as read_header reads a Dataset (`get`,
    `file_meta`)."""

    file_meta: dict[str, Any]


def _fast_dataset(data: bytes) -> _Found | None:
    """The HEADER_TAGS (and the file meta) of an encoded file, found by stepping over every other element by
    its length and decoded by pydicom's converters; None when the bytes hold anything this reader does not walk
    itself (no preamble, a transfer syntax other than little endian uncompressed or encapsulated, a VR it does
    not know, a value past the end, an item where an element belongs): read_partial reads those.

    pydicom's reader builds a Python object for every element and sequence item it passes and looks each up
    again when read (~1 ms for a CT slice's header); this reads the same header in ~0.3 ms."""
    size = len(data)
    try:
        if size < 132 or data[128:132] != b"DICM":
            return None
        pos, syntax = 132, None
        while data[pos:pos + 2] == b"\x02\x00":  # the file meta: only its Transfer Syntax UID is read
            tag, vr, length, pos = _element(data, pos, False)
            if length == _UNDEFINED or pos + length > size or vr == b"UN":
                raise _Unsure
            if tag == 0x00020010:
                syntax = data[pos:pos + length]
            pos += length
        if syntax is None:
            return None
        uid = UID(syntax.decode("ascii").rstrip("\0 "))
        if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
            return None
        implicit = uid.is_implicit_VR
        raws = []
        unpack_tag, unpack_u16, unpack_u32 = _TAG.unpack_from, _U16.unpack_from, _U32.unpack_from
        while pos < size:  # _element and _skip_value inlined: this loop runs for every top-level element
            if pos + 8 > size:
                raise _Unsure
            group, number = unpack_tag(data, pos)
            tag = group << 16 | number
            if tag >= 0x7FE00008:  # _PIXELS as an int: comparing with a BaseTag costs a method call
                break
            if group == 0xFFFE:
                raise _Unsure
            if implicit:
                vr, length, start = None, unpack_u32(data, pos + 4)[0], pos + 8
            else:
                vr = data[pos + 4:pos + 6]
                if vr in _LONG_VRS:
                    if pos + 12 > size:
                        raise _Unsure
                    length, start = unpack_u32(data, pos + 8)[0], pos + 12
                elif vr in _VRS:
                    length, start = unpack_u16(data, pos + 6)[0], pos + 8
                else:
                    raise _Unsure
            pos = start + length if length != _UNDEFINED else _skip_value(data, start, vr, length, implicit, 0)
            if pos > size:
                raise _Unsure
            if tag in _WANTED:
                if vr == b"UN":
                    raise _Unsure
                end = pos - 8 if length == _UNDEFINED else pos  # an undefined-length value without its delimiter
                raws.append(RawDataElement(Tag(tag), vr.decode() if vr else None, length, data[start:end], start,
                                           implicit, True))
    except (_Unsure, UnicodeDecodeError):
        return None
    try:
        charset = next((r for r in raws if r.tag == 0x00080005), None)
        encodings = convert_encodings(convert_raw_data_element(charset).value) if charset else [default_encoding]
        found = _Found()
        for raw in raws:
            element = convert_raw_data_element(raw, encoding=encodings)
            found[element.keyword] = element.value
    except Exception:  # a value pydicom cannot decode: read_header's own handling of it, on read_partial's dataset
        return None
    found.file_meta = {"TransferSyntaxUID": uid}
    return found


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
            ds = _fast_dataset(source) or read_partial(BytesIO(source), stop_when=_at_pixels,
                                                       specific_tags=HEADER_TAGS)
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
