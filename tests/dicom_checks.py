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


# --- PixelMed (Debian pixelmed-apps) -------------------------------------------------------------------------

PIXELMED_JARS = ("/usr/share/java/pixelmed.jar",)  # its manifest Class-Path names the other jars it needs
# Java 17's XPath limits are far below what PixelMed's compiled IOD/SR stylesheets use: lift them
PIXELMED_JAVA = ["java", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathExprOpLimit=0",
                 "-Djdk.xml.xpathTotalOpLimit=0", "-Xss8m"]
PIXELMED_UNRECOGNIZED = "IOD (SOP Class) unrecognized"
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _pixelmed_run(cls: str, path: Path) -> list[str]:
    jars = [j for j in PIXELMED_JARS if Path(j).is_file()]
    need(have("java") and bool(jars), "PixelMed validator (Debian pixelmed-apps, Java) not installed")
    cmd = [*PIXELMED_JAVA, "-cp", ":".join(jars), f"com.pixelmed.validate.{cls}", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    if out.returncode != 0 or any(ln.startswith(("Exception", "java.", "\tat ")) for ln in lines):
        raise AssertionError(f"PixelMed {cls} crashed on {path.name} (exit {out.returncode}):\n" + "\n".join(lines))
    return lines


def pixelmed(path: Path) -> tuple[list[str], list[str]]:
    """PixelMed's validators on one file; returns (error lines, warning lines), each prefixed with the validator.

    SR (any 1.2.840.10008.5.1.4.1.1.88.x SOP class): com.pixelmed.validate.DicomSRValidator, which checks the
    IOD and then the root template (TID 1500 and the templates it includes). Anything else:
    com.pixelmed.validate.DicomInstanceValidator (IOD and modules; it does not know SR SOP classes). Output lines
    start "Error: " or "Warning: "; others are progress ("Found Segmentation IOD", "IOD validation complete").
    Debian's pixelmed.jar compiles IOD rules for a few SOP classes only (Segmentation, Enhanced/Legacy Converted
    CT and MR, MR Spectroscopy, Raw Data; all SR IODs in the SR validator): for others (Secondary Capture) it says
    "IOD (SOP Class) unrecognized", returned here as a warning. Fails in CI when Java or the jar is missing."""
    sop_class = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
    cls = "DicomSRValidator" if sop_class.startswith(SR_SOP_CLASS_PREFIX) else "DicomInstanceValidator"
    errors, warnings = [], []
    for ln in _pixelmed_run(cls, path):
        if ln.startswith("Error"):
            errors.append(f"{cls}: {ln}")
        elif ln.startswith("Warning") or ln.strip() == PIXELMED_UNRECOGNIZED:
            warnings.append(f"{cls}: {ln}")
    return errors, warnings


def pixelmed_recognised(warnings: list[str]) -> bool:
    """Whether PixelMed had IOD rules for the object (False: it validated nothing)."""
    return not any(w.endswith(PIXELMED_UNRECOGNIZED) for w in warnings)


# --- dcmqi (PyPI dcmqi: segimage2itkimage, tid1500reader) -----------------------------------------------------

DCMQI_ERROR = ("E:", "F:", "ERROR", "Error", "Fatal", "fatal", "ITK ERROR", "PARSE ERROR")
DCMQI_WARNING = ("W:", "WARNING", "Warning", "Failed to")  # "Failed to get CIELab values - initializing to default"


def dcmqi_tool(name: str) -> str:
    """The dcmqi binary: next to this interpreter (the venv's bin, where pip puts the console scripts) or on PATH."""
    import os
    import shutil
    import sys

    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    need(found is not None, f"dcmqi {name} not installed (pip install dcmqi)")
    return str(found)


def _dcmqi_run(cmd: list[str], path: Path) -> list[str]:
    """Run a dcmqi tool; returns its warning lines; raises AssertionError with its output on an error."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    errors = [ln for ln in lines if ln.lstrip().startswith(DCMQI_ERROR)]
    if out.returncode != 0 or errors:
        raise AssertionError(f"{Path(cmd[0]).name} failed on {path.name} (exit {out.returncode}):\n" + "\n".join(lines))
    return [ln for ln in lines if ln.lstrip().startswith(DCMQI_WARNING)]


def dcmqi_seg(path: Path, out_dir: Path) -> tuple[list[Path], list[str]]:
    """segimage2itkimage on a SEG: ([<group>.nrrd..., meta.json], warning lines). One NRRD per segment group
    (dcmqi puts non-overlapping segments in one group as label values: meta.json's segmentAttributes[i] lists the
    segments of `<i+1>.nrrd` with their labelID). Raises AssertionError with dcmqi's output when it fails (a SEG
    without a frame of reference cannot be converted: "Failed to get image directions")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [dcmqi_tool("segimage2itkimage"), "--inputDICOM", str(path), "--outputDirectory", str(out_dir),
           "-t", "nrrd"]
    warnings = _dcmqi_run(cmd, path)
    images = sorted(out_dir.glob("*.nrrd"), key=lambda p: int(p.stem) if p.stem.isdigit() else 10**9)
    meta = out_dir / "meta.json"
    assert images and meta.is_file(), f"segimage2itkimage wrote {sorted(p.name for p in out_dir.iterdir())}"
    return [*images, meta], warnings


def dcmqi_sr(path: Path, out_dir: Path) -> tuple[dict, list[str]]:
    """tid1500reader on a TID 1500 SR: (its JSON, warning lines). Raises AssertionError when it fails."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}-tid1500.json"
    warnings = _dcmqi_run([dcmqi_tool("tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(target)],
                          path)
    assert target.is_file(), f"tid1500reader wrote no {target.name}"
    return json.loads(target.read_text()), warnings


def read_nrrd(path: Path):
    """A NRRD as dcmqi/ITK write it: (array (z, y, x), header dict, origin (3,), axis vectors (3, 3): one row per
    axis x, y, z, each direction * spacing, in the file's space (LPS for dcmqi))."""
    import gzip
    import re

    import numpy as np

    raw = path.read_bytes()
    head, _, data = raw.partition(b"\n\n")
    header: dict[str, str] = {}
    for line in head.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        header[key.strip()] = value.lstrip("=").strip()
    assert "data file" not in header, f"{path.name}: detached NRRD data are not supported"
    dtypes = {"short": "i2", "signed short": "i2", "unsigned short": "u2", "ushort": "u2", "uchar": "u1",
              "unsigned char": "u1", "char": "i1", "signed char": "i1", "int": "i4", "unsigned int": "u4",
              "uint": "u4", "float": "f4", "double": "f8"}
    dtype = np.dtype(dtypes[header["type"]]).newbyteorder("<" if header.get("endian", "little") == "little" else ">")
    if header.get("encoding") in {"gzip", "gz"}:
        data = gzip.decompress(data)
    elif header.get("encoding") != "raw":
        raise AssertionError(f"{path.name}: NRRD encoding {header.get('encoding')} not supported")
    sizes = [int(s) for s in header["sizes"].split()]
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])
    vec = lambda s: [float(v) for v in s.strip("()").split(",")]  # noqa: E731
    origin = np.array(vec(header["space origin"]))
    axes = np.array([vec(v) for v in re.findall(r"\([^)]*\)", header["space directions"])])
    return array, header, origin, axes
