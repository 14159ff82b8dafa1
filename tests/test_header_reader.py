"""read_header's own reader of the bytes (node/dicom/header.py, _fast_dataset) against pydicom's read_partial:
the same header, or the same error, for every file of the shared data, for structures it has to step over
(undefined-length sequences and items, nested sequences, a private UN of undefined length, encapsulated pixel
data in an icon), for character sets, and for every truncation of a header."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from node.dicom import header as header_module
from node.dicom.header import read_header


def outcome(data: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    """read_header's header, or its error's type and message; `fast=False` leaves every data set to pydicom."""
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(header_module, "_fast_dataset", lambda data: None)
        try:
            return read_header(data)
        except Exception as exc:  # the comparison is of the errors too
            return type(exc).__name__, str(exc)


def took_fast_path(data: bytes) -> bool:
    return header_module._fast_dataset(data) is not None


def encode(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def undefined(elem_or_seq: DataElement) -> DataElement:
    elem_or_seq.is_undefined_length = True
    for item in elem_or_seq.value:
        item.is_undefined_length_sequence_item = True
    return elem_or_seq


def base_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "Some Vendor"
    ds.StudyDescription = "Thorax"
    ds.SeriesDescription = "lung 1.0 B70f"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.SeriesNumber = "3"
    ds.AcquisitionNumber = "1"
    # a value of every length form: 4-byte (UT, UR, UC, OB, OW, OF, OD, OL, UV, SV) and 2-byte
    for tag, vr, value in [(0x0040A160, "UT", "a long text"), (0x00287FE0, "UR", "http://pacs/pixels"),
                           (0x00080119, "UC", "long code"), (0x00091010, "OB", b"\1\2"), (0x00091011, "OW", b"\1\2"),
                           (0x00091012, "OF", b"\0" * 4), (0x00091013, "OD", b"\0" * 8), (0x00091014, "OL", b"\0" * 4),
                           (0x00091015, "UV", 2**40), (0x00091016, "SV", -2), (0x00091017, "FD", 1.5),
                           (0x00091018, "AT", 0x00100010), (0x00091019, "US", 7), (0x0009101A, "SS", -7)]:
        ds.add_new(tag, vr, value)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = b"\0" * 8
    return ds


def nested(ds: Dataset) -> Dataset:
    """Undefined-length sequences and items around the elements read_header wants, a sequence inside an item,
    a private UN of undefined length (implicit VR inside), and an icon whose pixel data is encapsulated."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "123", "99X", "code"
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedurePriority = "stat"
    item.ReasonForRequestedProcedureCodeSequence = undefined(DataElement(0x0040100A, "SQ", Sequence([inner])))
    ds.RequestAttributesSequence = Sequence([item, Dataset()])
    undefined(ds["RequestAttributesSequence"])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    ds.ReferencedImageSequence = Sequence([ref])  # defined length
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 2, 2, 8, 8, 7
    icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.PixelRepresentation = 1, "MONOCHROME2", 0
    icon.PixelData = encapsulate([b"\x01\x02\x03\x04"])
    icon["PixelData"].VR = "OB"
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = undefined(DataElement(0x00880200, "SQ", Sequence([icon])))
    # a private sequence written as UN of undefined length: its content is implicit VR little endian
    private = Dataset()
    private.add_new(0x00091001, "LO", "inside")
    seq = undefined(DataElement(0x00091002, "SQ", Sequence([private])))
    ds[0x00091002] = seq
    return ds


def test_every_shared_file_reads_the_same(data_root: Path, ct_dir: Path, monkeypatch):
    """Every file of the shared data, broken ones included; the CT's slices (explicit or implicit VR little
    endian) all take the fast reader."""
    fast = set()
    files = [p for p in sorted(data_root.rglob("*")) if p.is_file() and p.suffix.lower() not in (".md", ".txt", ".csv")]
    assert files
    for path in files:
        data = path.read_bytes()
        assert outcome(data, True, monkeypatch) == outcome(data, False, monkeypatch), path
        if took_fast_path(data):
            fast.add(path)
    slices = sorted(ct_dir.glob("*.dcm"))
    assert slices and fast >= set(slices), f"{len(set(slices) - fast)} CT slices not read by the fast reader"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_nested_and_undefined_lengths(syntax, monkeypatch):
    data = encode(nested(base_dataset()), syntax)
    assert took_fast_path(data)
    h = outcome(data, True, monkeypatch)
    assert h == outcome(data, False, monkeypatch)
    assert h.requested_priority == "STAT" and h.series_description == "lung 1.0 B70f"
    assert h.image_type == "ORIGINAL\\PRIMARY\\AXIAL" and h.slice_thickness == 1.25 and h.series_number == 3


def test_private_un_of_undefined_length(monkeypatch):
    # the private sequence written as UN of undefined length, as a node that did not know it forwards it: its
    # content then is implicit VR little endian (PS3.5 6.2.2)
    plain = encode(nested(base_dataset()), ExplicitVRLittleEndian)
    implicit_item = (b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x09\x00\x01\x10\x06\x00\x00\x00inside"
                     + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00")
    start = plain.index(b"\x09\x00\x02\x10SQ\x00\x00\xff\xff\xff\xff")
    end = plain.index(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", start) + 8
    data = (plain[:start] + b"\x09\x00\x02\x10UN\x00\x00\xff\xff\xff\xff" + implicit_item
            + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" + plain[end:])
    assert took_fast_path(data)
    assert outcome(data, True, monkeypatch) == outcome(data, False, monkeypatch)
    assert dcmread(BytesIO(data))[0x00091002].VR in ("UN", "SQ")  # pydicom reads the whole file too


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_every_value_length_form(syntax, monkeypatch):
    data = encode(base_dataset(), syntax)
    assert took_fast_path(data)
    h = outcome(data, True, monkeypatch)
    assert h == outcome(data, False, monkeypatch) and h.body_part_examined == "CHEST" and h.manufacturer == "Some Vendor"


def test_character_sets(monkeypatch):
    for charset, text in [("ISO_IR 192", "Thorax ÄÖÜ 胸部"), ("ISO_IR 100", "Thorax Öl"),
                          (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎")]:
        ds = base_dataset()
        ds.SpecificCharacterSet = charset
        ds.StudyDescription = text
        data = encode(ds, ExplicitVRLittleEndian)
        assert took_fast_path(data)
        h = outcome(data, True, monkeypatch)
        assert h == outcome(data, False, monkeypatch), charset
        assert h.study_description == text


def test_values_pydicom_cannot_decode(monkeypatch):
    """Malformed values (a number that is not one, a character set that does not exist, bytes that are not
    text in it, a transfer syntax that is not ASCII): the same header or error as read_partial gives."""
    cases = []
    # a valid placeholder, encoded, then its bytes replaced by the same number of malformed ones
    for keyword, placeholder, value in [("SeriesNumber", "9876", b"abc "), ("SliceThickness", "9.876", b"x.y.z "),
                                        ("AcquisitionNumber", ["98", "76"], b"1\\2abc"),
                                        ("SpecificCharacterSet", "ISO_IR 192", b"ISO_IR 999"),
                                        ("StudyDescription", "Thorax", b"\xff\xfe\xfd\xfc\xfb\xfa")]:
        ds = base_dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        setattr(ds, keyword, placeholder)
        data = encode(ds, ExplicitVRLittleEndian)
        old = "\\".join(placeholder).encode() if isinstance(placeholder, list) else placeholder.encode()
        old += b" " * (len(old) % 2)
        assert data.count(old) == 1 and len(value) == len(old), keyword
        cases.append(data.replace(old, value))
    raw = encode(base_dataset(), ExplicitVRLittleEndian)
    cases.append(raw.replace(b"Some Vendor", b"Some\xe9\xe8ndor"))
    cases.append(raw.replace(ExplicitVRLittleEndian.encode(), b"1.2.840.10008.1.\xb2.1"))
    for data in cases:
        assert outcome(data, True, monkeypatch) == outcome(data, False, monkeypatch)


def test_left_to_pydicom(monkeypatch):
    """Big endian, a data set not in the file's declared encoding, no preamble: pydicom reads them."""
    ds = base_dataset()
    big = encode(ds, ExplicitVRBigEndian)
    assert not took_fast_path(big)
    assert outcome(big, True, monkeypatch).modality == "CT"
    explicit = encode(base_dataset(), ExplicitVRLittleEndian)
    lying = explicit.replace(ExplicitVRLittleEndian.encode() + b"\0", ImplicitVRLittleEndian.encode() + b"\0\0\0")
    assert outcome(lying, True, monkeypatch) == outcome(lying, False, monkeypatch)
    assert not took_fast_path(explicit[128 + 4:])
    compressed = base_dataset()
    compressed.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 8])
    compressed["PixelData"].is_undefined_length = True
    data = encode(compressed, JPEG2000Lossless)
    assert took_fast_path(data) and outcome(data, True, monkeypatch) == outcome(data, False, monkeypatch)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_every_truncation(syntax, monkeypatch):
    data = encode(nested(base_dataset()), syntax)
    header_end = data.index(b"\xe0\x7f\x10\x00")
    for cut in range(0, header_end + 12):
        part = data[:cut]
        assert outcome(part, True, monkeypatch) == outcome(part, False, monkeypatch), cut
