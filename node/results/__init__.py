"""Encode step: a plugin's Findings become files under <data dir>/outputs/<job id>/: SEG.dcm, SR.dcm, SC-NNN.dcm,
findings.json and arrays.npz."""

from __future__ import annotations

from pathlib import PurePath
from typing import Literal

ObjectKind = Literal["SR", "SEG", "SC"]


def object_file(kind: ObjectKind, number: int = 1) -> str:
    """The file name of an encoded object in a job's outputs folder."""
    return f"SC-{number:03d}.dcm" if kind == "SC" else f"{kind}.dcm"


def object_kind(path: str | PurePath) -> ObjectKind | None:
    """SR, SEG or SC for the DICOM files the encoders write (see object_file), else None."""
    name = PurePath(path).name
    if name in ("SR.dcm", "SEG.dcm"):
        return "SR" if name == "SR.dcm" else "SEG"
    return "SC" if name.startswith("SC-") and name.endswith(".dcm") else None
