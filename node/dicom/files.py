"""DICOM files on disk: discovery under folders, zip guards, grouping by series from the headers, and the
preamble and file meta a received data set is stored with."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

MAX_ZIP_BYTES = 8 * 1024**3  # refuse a zip that would expand beyond this (zip bombs)


class ZipTooLarge(ValueError):
    """The zip would expand beyond MAX_ZIP_BYTES."""


def zip_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The file members of `archive`. Raises ZipTooLarge when they expand beyond MAX_ZIP_BYTES."""
    members = [m for m in archive.infolist() if not m.is_dir()]
    if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
        raise ZipTooLarge(f"expands beyond {MAX_ZIP_BYTES // 1024**3} GiB")
    return members


def iter_dicom_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under `paths` (recursively), sorted, skipping obvious non-DICOM documentation files."""
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() not in {".md", ".txt", ".csv", ".json", ".html"}:
                    yield f
        elif p.is_file():
            yield p


def group_series(files: list[Path], on_file: Callable[[], None] = lambda: None
                 ) -> tuple[dict[str, list[Path]], dict[str, dict[str, str | None]], int]:
    """Files grouped by Series Instance UID (in file order), each series' descriptions, and the number of
    files that are not DICOM (skipped). `on_file` is called after each file (a progress bar)."""
    series: dict[str, list[Path]] = {}
    info: dict[str, dict[str, str | None]] = {}
    skipped = 0
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError, KeyError, TypeError):
            skipped += 1
            continue
        finally:
            on_file()
        series.setdefault(uid, []).append(f)
        if uid not in info:
            info[uid] = {k: (str(ds.get(k)) if ds.get(k) is not None else None) for k in
                         ("Modality", "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")}
    return series, info, skipped


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian; `value` already padded to an even length."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def file_meta_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     implementation_uid: str, implementation_version: str) -> bytes:
    """The 128-byte preamble, "DICM" and the File Meta Information (group length, version, media storage SOP
    class and instance, transfer syntax, implementation class UID and version name) of a DICOM file: the bytes
    that go before a data set received over the network. Byte-for-byte what pydicom writes for the same
    values, without building a data set (this runs for every received instance). Raises UnicodeEncodeError
    for a non-ASCII value."""
    version = implementation_version.encode("ascii")
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _uid(sop_class_uid)),
        _meta_element(0x0003, b"UI", _uid(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _uid(transfer_syntax_uid)),
        _meta_element(0x0012, b"UI", _uid(implementation_uid)),
        _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body
