"""Persist step: durable, idempotent instance files (temp file, fsync, atomic rename) and their header."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StorageError(Exception):
    """Base class: the instance was not stored."""


class InvalidUID(StorageError):
    """A UID is missing or not a valid DICOM UID; it never reaches a path."""


class StorageFull(StorageError):
    """No space left for the instance (or below the configured reserve)."""


class UndecodableDataset(StorageError):
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


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional attribute must not reject the instance
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit] or None


def _number(ds: Dataset, keyword: str, kind: type) -> float | int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else kind(value)
    except Exception:
        return None


def read_header(source: bytes | Path) -> InstanceHeader:
    """Parse the header of an encoded DICOM file (bytes with file meta, or a path), never its pixels.

    Raises UndecodableDataset when the bytes cannot be parsed, InvalidUID when a required UID
    (study, series, SOP instance, SOP class) is missing or malformed.
    """
    try:
        ds = dcmread(BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True)
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
    )


class InstanceStore:
    """Instance files under `<data dir>/instances/<study>/<series>/<sop>.dcm`, written durably."""

    def __init__(self, root: Path, tmp_dir: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def relative_path(self, header: InstanceHeader) -> str:
        """Path of an instance relative to the store root; every part is a validated UID."""
        for uid, what in (
            (header.study_uid, "StudyInstanceUID"),
            (header.series_uid, "SeriesInstanceUID"),
            (header.sop_instance_uid, "SOPInstanceUID"),
        ):
            check_uid(uid, what)
        return f"{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write(self, header: InstanceHeader, data: bytes) -> str:
        """Write `data` durably at the instance's path and return the relative path.

        Temp file in the store's tmp dir, fsync, atomic rename over any previous copy (a re-sent
        instance replaces the old one), fsync of the directory. Raises StorageFull when the disk
        is full or below the reserve, InvalidUID for a bad UID, OSError for other I/O failures.
        """
        relative = self.relative_path(header)
        final = self.root / relative
        if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
            raise StorageFull("free space below the configured reserve")
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._ensure_dir(final.parent)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise StorageFull(f"disk full: {exc.strerror}") from exc
            raise
        return relative

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        directory.mkdir(parents=True, exist_ok=True)
        for d in reversed(missing):  # make the new directory entries durable too
            _fsync_dir(d.parent)

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash; returns how many were removed."""
        removed = 0
        for p in self.tmp_dir.glob("*.part"):
            _unlink_quietly(p)
            removed += 1
        return removed

    def iter_files(self):
        """Yield the relative path of every stored instance file."""
        for p in self.root.glob("*/*/*.dcm"):
            yield str(p.relative_to(self.root))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
