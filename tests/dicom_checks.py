"""Checks every encoded object goes through: dciodvfy (no errors) and a strict pydicom re-read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom import config

from tests.conftest import have, need


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy on one file; returns (error lines, warning lines). Fails in CI without dciodvfy."""
    need(have("dciodvfy"), "dciodvfy (dicom3tools) not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def assert_valid(path: Path) -> pydicom.Dataset:
    """dciodvfy reports no errors (warnings are printed), and pydicom re-reads it strictly."""
    errors, warnings = dciodvfy(path)
    for w in warnings:
        print(f"dciodvfy {path.name}: {w}")
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        return pydicom.dcmread(path)
    finally:
        config.settings.reading_validation_mode = old
