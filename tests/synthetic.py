"""Test data: synthetic CT series (chest and head phantoms) written as real DICOM files with pydicom.

The phantoms are defined in patient millimetres (LPS: +x left, +y posterior, +z head), so volumes do not
depend on the sampling: the chest phantom holds about 2.6 l of lung air in the default 100 mm slab (about
26 ml per mm near the centre, so 5 slices of 2.5 mm still pass the 300 ml lung check), the head phantom
about 4 ml of sinus air. No real patient data: PatientName "Phantom^Synthetic", PatientID "PHANTOM".
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.uid import generate_uid

from node.demo.phantom import INTERCEPT, SliceHeader, write_ct_slice

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

DEFAULT_FOV_MM = {"chest": 400.0, "head": 250.0}
DEFAULT_DESCRIPTIONS = {
    "chest": ("CT CHEST WITHOUT CONTRAST", "Chest 2.5mm"),
    "head": ("CT HEAD WITHOUT CONTRAST", "Head 2.5mm"),
}


def write_ct_series(
    folder: Path,
    kind: Literal["chest", "head"] = "chest",
    slices: int = 40,
    spacing: float = 2.5,
    pixel_spacing: float | None = None,
    size: int = 128,
    missing: Collection[int] = (),
    tilt_mm: float = 0.0,
    gantry_tilt: float = 0.0,
    flip_orientation_at: Collection[int] = (),
    jitter: float | None = None,
    duplicate_at: Collection[int] = (),
    localizer: bool = False,
    study_description: str | None = None,
    series_description: str | None = None,
    body_part: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    seed: int = 0,
) -> list[Path]:
    """Write a synthetic axial CT series into `folder` (created if needed); return the files in slice order
    (a localizer last). Files are named by SOP Instance UID, so several series may share a folder.

    - `kind`: "chest" (body ellipse 40 HU in -1000 HU air, a table line under it, spine, two lungs of
      -850 HU and a trachea) or "head" (skull ring 1000 HU, brain 35 HU, a small sinus air pocket).
    - `slices` positions `spacing` mm apart along +z, centred on the phantom; `size` x `size` pixels of
      `pixel_spacing` mm (default: the phantom's field of view / size, 400 mm chest, 250 mm head).
    - `missing`: slice indices not written (a gap). `duplicate_at`: indices written twice (new SOP UID).
    - `tilt_mm`: each slice's ImagePositionPatient moves this far along +y per slice (a sheared stack, as
      from gantry tilt); `gantry_tilt`: the GantryDetectorTilt value written (degrees).
    - `flip_orientation_at`: indices written as sagittal planes through the phantom instead of axial.
    - `jitter`: each slice is moved along z by a random offset in [-jitter, jitter] mm (uneven spacing).
    - `localizer`: also write one coronal LOCALIZER image into the series.
    - descriptions default to a plain "CT CHEST/HEAD ..." wording; BodyPartExamined only when given.
    - UIDs are generated unless given; two calls with the same `series_uid` write into one series (each
      call centres its slices on the phantom, so their positions coincide unless the sizes differ).
    """
    folder.mkdir(parents=True, exist_ok=True)
    fov = DEFAULT_FOV_MM[kind]
    ps = pixel_spacing if pixel_spacing is not None else fov / size
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    default_study, default_series = DEFAULT_DESCRIPTIONS[kind]
    context = {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_uid": frame_uid,
        "study_description": default_study if study_description is None else study_description,
        "series_description": default_series if series_description is None else series_description,
        "body_part": body_part,
        "series_number": series_number,
        "spacing": spacing,
        "gantry_tilt": gantry_tilt,
    }
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-jitter, jitter, slices) if jitter else np.zeros(slices)
    z0 = -(slices - 1) / 2.0 * spacing
    half = (size - 1) / 2.0 * ps
    paths: list[Path] = []
    number = 0
    for i in range(slices):
        if i in missing:
            continue
        z = z0 + i * spacing + float(offsets[i])
        if i in flip_orientation_at:
            orientation, position = SAGITTAL, (0.0, -half, z + half)
        else:
            orientation, position = AXIAL, (-half, -half + i * tilt_mm, z)
        for _ in range(2 if i in duplicate_at else 1):
            number += 1
            hu = _phantom(kind, position, orientation, size, ps, rng)
            image_type = ("ORIGINAL", "PRIMARY", "AXIAL")
            paths.append(_write(folder, hu, position, orientation, ps, number, image_type, context))
    if localizer:
        number += 1
        position = (-half, 0.0, half)
        hu = _phantom(kind, position, CORONAL, size, ps, rng)
        paths.append(_write(folder, hu, position, CORONAL, ps, number, ("ORIGINAL", "PRIMARY", "LOCALIZER"), context))
    return paths


def _phantom(
    kind: str,
    position: tuple[float, float, float],
    orientation: tuple[float, ...],
    size: int,
    ps: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """HU of the phantom sampled on one image plane (pixel centres in patient coordinates)."""
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    r, c = np.meshgrid(np.arange(size) * ps, np.arange(size) * ps, indexing="ij")
    points = np.asarray(position)[None, None, :] + c[..., None] * row + r[..., None] * col
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    hu = np.full((size, size), -1000.0)
    if kind == "chest":
        body = _ellipse(x, y, 0, 0, 170, 120) & (np.abs(z) <= 300)
        hu[body] = 40.0
        hu[(np.abs(y - 135) <= 3) & (np.abs(x) <= 190)] = 200.0  # table, below the body with an air gap
        hu[_ellipse(x, y, 0, 85, 15, 15) & body] = 600.0  # spine
        for side in (-75.0, 75.0):
            hu[_ellipsoid(x, y, z, side, -10, 0, 55, 80, 130)] = -850.0  # lungs
        hu[_ellipse(x, y, 0, -30, 9, 9) & (z > 0) & (z < 150)] = -1000.0  # trachea
    else:
        head = _ellipsoid(x, y, z, 0, 0, 0, 75, 95, 100)
        hu[head] = 1000.0  # skull
        hu[_ellipsoid(x, y, z, 0, 0, 0, 68, 88, 93)] = 35.0  # brain
        hu[_ellipsoid(x, y, z, 0, -75, -20, 12, 8, 10)] = -1000.0  # sinus air, about 4 ml
        hu[(np.abs(y - 105) <= 3) & (np.abs(x) <= 120)] = 200.0  # head rest
    hu += rng.normal(0.0, 5.0, hu.shape)
    return hu


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, cx: float, cy: float, cz: float, ax: float, ay: float, az: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


def _write(
    folder: Path,
    hu: np.ndarray,
    position: tuple[float, float, float],
    orientation: tuple[float, ...],
    ps: float,
    number: int,
    image_type: tuple[str, ...],
    context: dict,
) -> Path:
    header = SliceHeader(
        context["study_uid"], context["series_uid"], context["frame_uid"], context["study_description"],
        context["series_description"], body_part=context["body_part"], slice_thickness=context["spacing"],
        gantry_tilt=context["gantry_tilt"], series_number=context["series_number"], model_name="synthetic phantom",
        window=("40", "400"),
    )
    stored = np.clip(np.round(hu - INTERCEPT), 0, 4095)
    return write_ct_slice(folder, stored, position, orientation, ps, number, header, image_type)
