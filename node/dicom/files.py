"""DICOM files on disk: discovery under folders, zip guards, grouping by series from the headers."""

from __future__ import annotations

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
