"""Durable file writes: the one temp-file + fsync + rename helper every writer in the node uses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, content: bytes | Callable[[BinaryIO], object], *, tmp_dir: Path | None = None,
                 mode: int = 0o644, sync_dir: bool = False) -> None:
    """Write `content` (bytes, or a function that fills a binary file) to a temporary file (in `tmp_dir`, on
    the same file system, or beside `path`), fsync it, then rename it over `path`: a reader never sees half a
    file, and a crash leaves the old file or the new one. `sync_dir` also makes the rename itself durable
    (fsync of the directory). A failed write removes the temporary file and raises (OSError: ENOSPC for a
    full disk)."""
    tmp = (tmp_dir or path.parent) / f"{path.name}.{uuid.uuid4().hex[:16]}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            if callable(content):
                with open(fd, "wb", closefd=False) as f:
                    content(f)
            else:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (a new file, a rename) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
