"""External validators on every radnode output: dciodvfy, PixelMed and dcmqi on the SEG/SR/SC that three
representative plugin runs (tests/result_cases.py: lung-quant on a chest CT, cxr-pneumonia on a CR,
us-prostate-seg on a multi-frame US) write through the offline path.

- dciodvfy: no errors, and a strict pydicom re-read (`assert_valid`), on every object;
- PixelMed: no errors on every object (DicomSRValidator for the SR: IOD + TID 1500 templates);
- dcmqi tid1500reader on every SR: reads it without errors or unlisted warnings, and what it reads back holds every
  measurement and classification of findings.json, with segment references into the SEG;
- dcmqi segimage2itkimage on every SEG with a frame of reference: converts without errors or unlisted warnings, the
  NRRD lies on the source CT grid (size, spacing, origin, direction) and each segment is voxel-identical to
  arrays.npz `mask:<label>`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_checks import (
    assert_valid,
    dciodvfy,
    dcmqi_seg,
    dcmqi_sr,
    pixelmed,
    pixelmed_recognised,
    read_nrrd,
)
from tests.result_cases import Case, ct_case, cxr_case, result_work, us_case  # noqa: F401  (fixtures)

CASES = ["ct_case", "cxr_case", "us_case"]

# dcmqi warnings a radnode output may cause, each with the reason it is acceptable (a regular expression matched
# against the whole line). Empty: every dcmqi warning on a radnode object is a finding to fix.
DCMQI_ALLOWED_WARNINGS: dict[str, str] = {}


def _unlisted(warnings: list[str]) -> list[str]:
    return [w for w in warnings if not any(re.search(p, w) for p in DCMQI_ALLOWED_WARNINGS)]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return request.getfixturevalue(request.param)


def _report(failures: dict[str, list[str]]) -> str:
    return "\n".join(f"{name}:\n  " + "\n  ".join(lines) for name, lines in failures.items() if lines)


# PixelMed errors that are the validator's own, each with the reason (a regular expression against the line).
PIXELMED_KNOWN: dict[str, str] = {
    # A SEG without plane geometry (US, X-ray): PixelMed's stylesheet then checks the Derivation Image macro in
    # the shared functional group item *and* in each per-frame item, and its next rule forbids it in both.
    # radnode writes it per frame (each frame has its own source frame), as highdicom does and the standard
    # allows; moved to the shared item, PixelMed reports the same error for the per-frame items instead.
    r"DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item\[1\]/: Missing required "
    r"sequence attribute \(Type 2\)": "PixelMed requires the macro in the shared and the per-frame groups at once",
}


def _not_known(errors: list[str]) -> list[str]:
    return [e for e in errors if not any(re.search(p, e) for p in PIXELMED_KNOWN)]


# --- dciodvfy and PixelMed on every object ---------------------------------------------------------------------


def test_every_case_writes_its_objects(case: Case):
    expected = {"ct_case": {"SEG.dcm", "SR.dcm"}, "cxr_case": {"SR.dcm"}, "us_case": {"SEG.dcm", "SR.dcm"}}
    names = {p.name for p in case.dicom_outputs}
    kind = {"ct-lung-quant": "ct_case", "cxr-pneumonia": "cxr_case", "us-prostate-seg": "us_case"}[case.name]
    assert expected[kind] <= names and case.scs, names
    assert (case.out / "arrays.npz").is_file() and (case.out / "findings.json").is_file()
    if case.seg is not None:
        assert any(k.startswith("mask:") and v.any() for k, v in case.arrays().items()), "empty masks"


def test_dciodvfy_clean(case: Case):
    failures: dict[str, list[str]] = {}
    for path in case.dicom_outputs:
        t = time.perf_counter()
        errors, warnings = dciodvfy(path)
        print(f"dciodvfy {case.name}/{path.name}: {time.perf_counter() - t:.2f} s, {len(errors)} errors, "
              f"{len(warnings)} warnings")
        for w in warnings:
            print(f"  {w}")
        failures[path.name] = errors
    if any(failures.values()):
        pytest.fail(f"dciodvfy errors in {case.name}\n" + _report(failures), pytrace=False)
    for path in case.dicom_outputs:
        assert_valid(path)


@pytest.mark.timeout(900)  # the SR validator takes 15-60 s on the CT report (its TID 1500 stylesheet is large)
def test_pixelmed_no_errors(case: Case):
    failures: dict[str, list[str]] = {}
    for path in case.dicom_outputs:
        t = time.perf_counter()
        errors, warnings = pixelmed(path)
        print(f"PixelMed {case.name}/{path.name}: {time.perf_counter() - t:.2f} s, {len(errors)} errors, "
              f"{len(warnings)} warnings")
        for w in warnings:
            print(f"  {w}")
        for e in errors:
            print(f"  {e}")
        failures[path.name] = _not_known(errors)
        if path.name in {"SEG.dcm", "SR.dcm"}:  # Debian's PixelMed has IOD rules for these (not for SC)
            assert pixelmed_recognised(warnings), f"PixelMed did not recognise {path.name}: {warnings}"
    if any(failures.values()):
        pytest.fail(f"PixelMed errors in {case.name}\n" + _report(failures), pytrace=False)


# --- dcmqi: the SR ------------------------------------------------------------------------------------------------


def _items(document: dict) -> list[tuple[str, str, str, dict]]:
    """Every measurement item dcmqi read: (finding code, quantity code, unit code, value, its group)."""
    return [(g.get("Finding", {}).get("CodeValue"), item["quantity"]["CodeValue"], item["units"]["CodeValue"],
             float(item["value"]), g)
            for g in document.get("Measurements", []) for item in g.get("measurementItems", [])]


def test_dcmqi_reads_the_sr(case: Case, tmp_path: Path):
    assert case.sr is not None
    t = time.perf_counter()
    document, warnings = dcmqi_sr(case.sr, tmp_path)
    print(f"tid1500reader {case.name}/SR.dcm: {time.perf_counter() - t:.2f} s; warnings: {warnings}")
    assert not _unlisted(warnings), f"tid1500reader warnings on {case.name}/SR.dcm:\n" + "\n".join(warnings)
    findings = case.findings()
    items = _items(document)
    missing = []
    for m in findings["measurements"]:
        hit = [i for i in items if i[1] == m["concept"]["value"] and i[2] == m["unit"]
               and i[3] == pytest.approx(m["value"], rel=1e-6, abs=1e-9)]
        if not hit:
            missing.append(f"measurement {m['concept']['meaning']} = {m['value']} {m['unit']} "
                           f"(segment {m['segment']}, frame {m['frame']})")
    for c in findings["classifications"]:
        hit = [i for i in items if i[0] == c["concept"]["value"] and i[1] == "122157"
               and i[3] == pytest.approx(c["probability"], rel=1e-6)]
        if not hit:
            missing.append(f"classification {c['concept']['meaning']} p={c['probability']}")
    assert not missing, f"{case.name}: not in what tid1500reader reads back:\n" + "\n".join(missing)
    seg_refs = [g for g in document.get("Measurements", []) if "ReferencedSegment" in g]
    if case.seg is not None:
        seg = pydicom.dcmread(case.seg, stop_before_pixels=True)
        numbers = {int(s.SegmentNumber) for s in seg.SegmentSequence}
        assert seg_refs, f"{case.name}: no measurement group references a segment of the SEG"
        for g in seg_refs:
            assert g.get("segmentationSOPInstanceUID") == seg.SOPInstanceUID, g.get("TrackingIdentifier")
            assert int(g["ReferencedSegment"]) in numbers, g.get("TrackingIdentifier")
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
               for p in case.sources}
    assert set(document.get("imageLibrary", [])) <= sources | {None}


# --- dcmqi: the SEG ------------------------------------------------------------------------------------------------


def source_grid(files: list[Path]) -> dict:
    """The source CT's voxel grid from its headers: slices sorted along the normal (row x column cosines), as
    node.imaging orders them and arrays.npz stores the masks. Axis vectors are direction * spacing (LPS)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    dz = float(np.median(np.diff(positions @ normal)))
    dy, dx = (float(v) for v in headers[0].PixelSpacing)
    return {
        "size": (int(headers[0].Columns), int(headers[0].Rows), len(files)),
        "axes": np.array([row * dx, col * dy, normal * dz]),
        "positions": positions,
        "normal": normal,
        "spacing": (dx, dy, dz),
    }


def test_a_seg_without_patient_geometry_comes_with_outline_captures(cxr_case: Case, us_case: Case):
    """dcmqi (and any viewer) needs patient geometry to place a SEG: the CR job writes none, the US SEG has no
    frame of reference (the source has none), and its masks go out as outline SCs as well."""
    assert cxr_case.seg is None
    seg = pydicom.dcmread(us_case.seg, stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in pydicom.dcmread(us_case.sources[0], stop_before_pixels=True)
    assert not seg.get("FrameOfReferenceUID")
    outlines = [p for p in us_case.scs
                if str(pydicom.dcmread(p, stop_before_pixels=True).DerivationDescription).startswith("Outline")]
    assert outlines


def test_dcmqi_converts_the_seg_onto_the_source_grid(ct_case: Case, tmp_path: Path):
    case = ct_case  # the case whose SEG has patient geometry
    seg = pydicom.dcmread(case.seg, stop_before_pixels=True)
    source = pydicom.dcmread(case.sources[0], stop_before_pixels=True)
    assert seg.get("FrameOfReferenceUID") == source.FrameOfReferenceUID
    t = time.perf_counter()
    outputs, warnings = dcmqi_seg(case.seg, tmp_path / "dcmqi")
    print(f"segimage2itkimage {case.name}/SEG.dcm: {time.perf_counter() - t:.2f} s; warnings: {warnings}")
    assert not _unlisted(warnings), f"segimage2itkimage warnings on {case.name}/SEG.dcm:\n" + "\n".join(warnings)
    *images, meta_path = outputs
    meta = json.loads(meta_path.read_text())
    grid = source_grid(case.sources)
    masks = {k.removeprefix("mask:"): v.astype(bool) for k, v in case.arrays().items() if k.startswith("mask:")}
    nz_src = grid["size"][2]
    seen: set[str] = set()
    problems: list[str] = []
    assert len(images) == len(meta["segmentAttributes"]), (images, meta["segmentAttributes"])
    for image_path, group in zip(images, meta["segmentAttributes"], strict=True):
        array, header, origin, axes = read_nrrd(image_path)
        assert header.get("space") == "left-posterior-superior", header.get("space")
        nz, ny, nx = array.shape
        print(f"{image_path.name}: sizes {nx} {ny} {nz}, origin {origin.round(4).tolist()}, axes "
              f"{axes.round(6).tolist()}; source {grid['size']}, first slice {grid['positions'][0].tolist()}")
        if (nx, ny) != grid["size"][:2]:
            problems.append(f"{image_path.name}: in-plane size {(nx, ny)} != source {grid['size'][:2]}")
        if not np.allclose(axes, grid["axes"], atol=1e-4):
            problems.append(f"{image_path.name}: axes (direction x spacing) {axes.tolist()} != source "
                            f"{grid['axes'].tolist()}")
        # the SEG may leave out empty slices: its volume starts at some source slice k and must end inside
        k = int(np.argmin(np.linalg.norm(grid["positions"] - origin, axis=1)))
        if not np.allclose(origin, grid["positions"][k], atol=1e-3):
            problems.append(f"{image_path.name}: origin {origin.tolist()} is no source slice position "
                            f"(nearest: slice {k} at {grid['positions'][k].tolist()})")
            continue
        if nz != nz_src or k != 0:
            print(f"{image_path.name}: covers source slices {k}..{k + nz - 1} of 0..{nz_src - 1}")
        if k + nz > nz_src:
            problems.append(f"{image_path.name}: slices {k}..{k + nz - 1} run past the source's {nz_src}")
            continue
        for segment in group:
            label, value = segment["SegmentLabel"], int(segment["labelID"])
            seen.add(label)
            if label not in masks:
                problems.append(f"{image_path.name}: segment {label!r} has no arrays.npz mask:{label}")
                continue
            expected = masks[label]
            if expected.shape != (nz_src, grid["size"][1], grid["size"][0]):
                problems.append(f"mask:{label} shape {expected.shape} is not the source grid {grid['size'][::-1]}")
                continue
            placed = np.zeros_like(expected)
            placed[k:k + nz] = array == value
            if not np.array_equal(placed, expected):
                diff = np.argwhere(placed != expected)
                problems.append(f"{label}: {len(diff)} voxels differ from arrays.npz (first at z,y,x "
                                f"{diff[0].tolist()}; dcmqi {int(placed.sum())} voxels, npz {int(expected.sum())})")
    unexported = {label for label, m in masks.items() if m.any()} - seen
    if unexported:
        problems.append(f"non-empty masks without a segment in dcmqi's output: {sorted(unexported)}")
    assert not problems, f"{case.name}/SEG.dcm through segimage2itkimage:\n" + "\n".join(problems)
