"""Test data: a synthetic chest CT phantom (body, table, lungs, emphysema, airways, vessels) written as DICOM.

`write_chest_phantom` writes one axial CT series and returns the file paths together with the TRUE lung
values, taken from the exact voxel labels the phantom was built from and the HU values written:

- a lung is its ellipsoid, holding parenchyma (about -850 HU, denser towards the back), emphysema-like
  clusters (-990 HU) and vessels (soft-tissue cylinders inside the lung, 40 HU), minus the airway lumen.
  Vessels inside a lung COUNT as lung, and so do the 2 mm soft-tissue walls of the bronchi where they
  run inside it; the airway lumen (trachea and both main bronchi, -1000 HU, also where a bronchus runs
  into the lung) does NOT. Emphysema keeps one voxel clear of the bronchial walls, so that no
  low-attenuation path joins a bronchus on the voxel grid (the blurred walls of a real scan do the same);
- LAA-950 is the percent of a lung's voxels whose written HU is below -950 (noise included), mean and
  15th percentile are taken over the same written values.

Patient coordinates are DICOM LPS (+x = the patient's left, +y = posterior, +z = head); the phantom is
centred on the origin. The right lung (at -x) is the larger. Nothing here is patient data: PatientName
"Phantom^Synthetic", PatientID "PHANTOM".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Voxel labels of `Phantom.labels`.
BACKGROUND, BODY, TABLE, RIGHT_LUNG, LEFT_LUNG, AIRWAY, GAS = 0, 1, 2, 3, 4, 5, 6

PARENCHYMA_HU = -850.0
EMPHYSEMA_HU = -990.0
AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 600.0
TABLE_HU = 200.0
NOISE_HU = 15.0
LAA_HU = -950.0
INTERCEPT = -1024.0
FOV_MM = 400.0

# (centre x, y, z; semi-axes x, y, z) in mm; right lung at -x (patient right).
RIGHT_ELLIPSOID = ((-75.0, -5.0, 0.0), (60.0, 85.0, 105.0))
LEFT_ELLIPSOID = ((75.0, -5.0, 0.0), (52.0, 80.0, 100.0))
TRACHEA = ((0.0, -25.0), 9.0)  # (x, y) of its axis, lumen radius; it runs from the top down to the carina
CARINA_Z = 45.0
BRONCHI = (  # main bronchi: carina -> a point inside each lung, lumen radius
    ((0.0, -25.0, CARINA_Z), (-55.0, -15.0, 15.0), 7.0),
    ((0.0, -25.0, CARINA_Z), (55.0, -15.0, 20.0), 6.0),
)
AIRWAY_WALL_MM = 2.0
STOMACH = ((50.0, -20.0, -120.0), (35.0, 25.0, 12.0))  # gas bubble below the left lung: not lung


@dataclass(frozen=True)
class LungTruth:
    """True values of one lung (or both): volume, mean HU, LAA-950 %, 15th percentile HU, emphysema %."""

    volume_ml: float
    mean_hu: float
    laa950_percent: float
    perc15_hu: float
    emphysema_percent: float  # voxels labelled emphysema (before noise), percent of the lung


# The truth in coded terms, so that a reader matches it with a plugin's coded measurements and segment types
# (never with a plugin's own labels). Per quantity: (coding scheme, code value) of the concept (DICOM or
# SNOMED CT; radnode's private scheme 99RADNODE where DICOM defines none), the name shown, the UCUM unit and
# the LungTruth field; per region: the SNOMED CT body structure, the name shown and the Phantom field.
TRUTH_QUANTITIES = (
    (("SCT", "118565006"), "volume", "mL", "volume_ml"),
    (("DCM", "112181"), "mean lung density", "HU", "mean_hu"),
    (("99RADNODE", "LAA950"), "LAA-950", "%", "laa950_percent"),
    (("99RADNODE", "PERC15"), "Perc15", "HU", "perc15_hu"),
)
TRUTH_REGIONS = (
    (("SCT", "3341006"), "right", "right"),  # Right lung
    (("SCT", "44029006"), "left", "left"),  # Left lung
    (("SCT", "39607008"), "total", "total"),  # Lung: both together
)


@dataclass(frozen=True)
class Phantom:
    """A written phantom series: files, UIDs, geometry and the truth.

    `labels` (uint8, BACKGROUND..GAS) and `hu` (float32, the values written) are indexed
    (slice, row, column) in the order the slices were written (slice k at ImagePositionPatient z = z[k]).
    """

    paths: list[Path]
    study_uid: str
    series_uid: str
    spacing: tuple[float, float, float]  # (slice step, row spacing, column spacing) in mm
    z: np.ndarray
    labels: np.ndarray
    hu: np.ndarray
    right: LungTruth
    left: LungTruth
    total: LungTruth


def write_chest_phantom(
    folder: Path,
    *,
    slices: int | None = None,
    spacing: float = 2.5,
    size: int = 256,
    seed: int = 0,
    mirrored: bool = False,
    emphysema_percent: tuple[float, float] = (12.0, 5.0),
    kernel: str = "STANDARD",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Phantom:
    """Write the chest phantom as one axial CT series into `folder` and return its truth.

    `slices` at `spacing` mm (default: enough slices to cover -135..135 mm, lungs included whole), each
    `size` x `size` pixels over a 400 mm field of view. `emphysema_percent` = the target share of
    emphysema in the (right, left) lung. `mirrored` writes the images with row direction -x and
    ImageOrientationPatient (-1, 0, 0, 0, 1, 0): columns run towards the patient's right and the slice
    normal points to the feet, so a reader that assumes the usual orientation swaps the lungs.
    Raises ValueError on a non-positive spacing or a size below 64 or slices below 1.
    """
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    n = int(np.ceil(270.0 / spacing)) + 1 if slices is None else slices
    if n < 1:
        raise ValueError(f"slices must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    ps = FOV_MM / size
    z = (np.arange(n) - (n - 1) / 2.0) * spacing
    centres = (np.arange(size) - (size - 1) / 2.0) * ps  # patient x of column j / y of row i (not mirrored)
    xs = -centres if mirrored else centres
    zz, yy, xx = np.meshgrid(z.astype(np.float32), centres.astype(np.float32), xs.astype(np.float32), indexing="ij")

    clearance = AIRWAY_WALL_MM + max(spacing, ps)  # no emphysema voxel touches a lumen voxel on the grid
    labels, hu, emphysema = _build(xx, yy, zz, rng, emphysema_percent, clearance)
    hu += rng.normal(0.0, NOISE_HU, hu.shape).astype(np.float32)
    stored = np.clip(np.round(hu - INTERCEPT), 0, 4095).astype("<u2")
    written = stored.astype(np.float32) + INTERCEPT

    right = _truth(written, labels == RIGHT_LUNG, emphysema, spacing, ps)
    left = _truth(written, labels == LEFT_LUNG, emphysema, spacing, ps)
    total = _truth(written, (labels == RIGHT_LUNG) | (labels == LEFT_LUNG), emphysema, spacing, ps)

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0) if mirrored else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    header = SliceHeader(study_uid, series_uid, frame_uid, "CT CHEST PHANTOM", "CHEST PHANTOM", body_part="CHEST",
                         slice_thickness=spacing, kernel=kernel, spacing_between_slices=spacing)
    paths = []
    for k in range(n):
        position = (float(xs[0]), float(centres[0]), float(z[k]))
        number = n - k if mirrored else k + 1  # InstanceNumber from head to feet when mirrored
        paths.append(write_ct_slice(folder, stored[k], position, orientation, ps, number, header))
    return Phantom(paths, study_uid, series_uid, (spacing, ps, ps), z, labels, written, right, left, total)


def _ellipsoid(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, spec: tuple, shrink: float = 0.0) -> np.ndarray:
    (cx, cy, cz), (ax, ay, az) = spec
    return (
        ((xx - cx) / (ax - shrink)) ** 2 + ((yy - cy) / (ay - shrink)) ** 2 + ((zz - cz) / (az - shrink)) ** 2
    ) <= 1.0


def _segment(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Voxels within r mm of the segment a-b (a capsule)."""
    ab = b - a
    t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (zz - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    d2 = (xx - a[0] - t * ab[0]) ** 2 + (yy - a[1] - t * ab[1]) ** 2 + (zz - a[2] - t * ab[2]) ** 2
    return d2 <= r * r


def _box(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    """Index ranges of the voxels whose centres lie in the box [lo, hi] (patient mm)."""
    out = []
    for axis, (coords, a, b) in enumerate(zip((zz, yy, xx), (lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0]),
                                              strict=True)):
        line = np.moveaxis(coords, axis, 0)[(slice(None),) + (0,) * (coords.ndim - 1)]
        inside = np.flatnonzero((line >= a) & (line <= b))
        out.append(slice(int(inside.min()), int(inside.max()) + 1) if inside.size else slice(0, 0))
    return tuple(out)


def _build(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, rng: np.random.Generator,
           emphysema_percent: tuple[float, float], clearance_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel labels, noise-free HU and the emphysema mask of the phantom on the grid (xx, yy, zz)."""
    labels = np.zeros(xx.shape, dtype=np.uint8)
    hu = np.full(xx.shape, AIR_HU, dtype=np.float32)
    body = ((xx / 170.0) ** 2 + (yy / 120.0) ** 2) <= 1.0
    labels[body] = BODY
    hu[body] = SOFT_TISSUE_HU
    hu[body & (((xx / 15.0) ** 2 + ((yy - 85.0) / 15.0) ** 2) <= 1.0)] = BONE_HU  # spine
    # a hollow table below the body, an air gap between: top and bottom plates joined by side walls
    table = ((np.abs(yy - 133.0) <= 2.0) | (np.abs(yy - 150.0) <= 2.0)) & (np.abs(xx) <= 185.0)
    table |= (np.abs(np.abs(xx) - 183.0) <= 2.0) & (yy >= 131.0) & (yy <= 152.0)
    labels[table] = TABLE
    hu[table] = TABLE_HU

    emphysema = np.zeros(xx.shape, dtype=bool)
    for spec, label, target in ((RIGHT_ELLIPSOID, RIGHT_LUNG, emphysema_percent[0]),
                                (LEFT_ELLIPSOID, LEFT_LUNG, emphysema_percent[1])):
        (cx, cy, cz), (ax, ay, az) = spec
        lung = _ellipsoid(xx, yy, zz, spec)
        labels[lung] = label
        hu[lung] = PARENCHYMA_HU + 0.25 * (yy[lung] - cy)  # dependent (posterior) lung is denser
        _emphysema(xx, yy, zz, spec, lung, target, rng, emphysema)
        _vessels(xx, yy, zz, spec, rng, hu)
    emphysema &= ~_airway(xx, yy, zz, clearance_mm)
    hu[emphysema] = EMPHYSEMA_HU

    airway = _airway(xx, yy, zz, 0.0)
    wall = _airway(xx, yy, zz, AIRWAY_WALL_MM) & ~airway  # soft tissue; inside a lung it is lung
    hu[wall] = SOFT_TISSUE_HU
    labels[airway] = AIRWAY
    hu[airway] = AIR_HU
    gas = _ellipsoid(xx, yy, zz, STOMACH)
    labels[gas] = GAS
    hu[gas] = AIR_HU
    return labels, hu, emphysema


def _emphysema(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, spec: tuple, lung: np.ndarray, target: float,
               rng: np.random.Generator, out: np.ndarray) -> None:
    """Spherical clusters (radius 4-12 mm), more in the upper lung, until `target` % of the lung is covered."""
    (cx, cy, cz), (ax, ay, az) = spec
    lung_voxels = int(np.count_nonzero(lung))
    goal = target / 100.0 * lung_voxels
    covered = 0
    for _ in range(500):
        if covered >= goal:
            break
        r = float(rng.uniform(4.0, 12.0))
        u = rng.uniform(-1.0, 1.0, 3)
        u[2] = abs(u[2]) if rng.random() < 0.7 else -abs(u[2])  # upper-lobe predominance
        if u @ u > 1.0:
            continue
        margin = 1.0 - (r + 6.0) / min(ax, ay, az)
        centre = np.array([cx, cy, cz]) + u * margin * np.array([ax, ay, az])
        box = _box(xx, yy, zz, centre - r, centre + r)
        sphere = ((xx[box] - centre[0]) ** 2 + (yy[box] - centre[1]) ** 2 + (zz[box] - centre[2]) ** 2) <= r * r
        new = sphere & lung[box] & ~out[box]
        out[box] |= new
        covered += int(np.count_nonzero(new))


def _vessels(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, spec: tuple, rng: np.random.Generator,
             hu: np.ndarray) -> None:
    """Soft-tissue cylinders (radius 1.5-4 mm) from near the hilum outwards, kept 6 mm inside the lung."""
    (cx, cy, cz), (ax, ay, az) = spec
    inner = _ellipsoid(xx, yy, zz, spec, shrink=6.0)
    hilum = np.array([cx - np.sign(cx) * 0.5 * ax, cy, cz + 0.1 * az])
    for _ in range(14):
        direction = rng.normal(size=3)
        direction[0] = np.sign(cx) * abs(direction[0])  # outwards, away from the mediastinum
        direction /= np.linalg.norm(direction)
        start = hilum + rng.normal(0.0, 8.0, 3)
        end = start + direction * rng.uniform(40.0, 80.0)
        r = float(rng.uniform(1.5, 4.0))
        box = _box(xx, yy, zz, np.minimum(start, end) - r, np.maximum(start, end) + r)
        vessel = _segment(xx[box], yy[box], zz[box], start, end, r) & inner[box]
        hu[box][vessel] = SOFT_TISSUE_HU


def _airway(xx: np.ndarray, yy: np.ndarray, zz: np.ndarray, grow: float) -> np.ndarray:
    """Trachea and main bronchi: the lumen (grow 0) or the lumen and its wall (grow = wall thickness)."""
    (tx, ty), tr = TRACHEA
    tr += grow
    airway = (((xx - tx) ** 2 + (yy - ty) ** 2) <= tr * tr) & (zz >= CARINA_Z)
    for a, b, r in BRONCHI:
        a, b, r = np.asarray(a), np.asarray(b), r + grow
        box = _box(xx, yy, zz, np.minimum(a, b) - r, np.maximum(a, b) + r)
        airway[box] |= _segment(xx[box], yy[box], zz[box], a, b, r)
    return airway


def _truth(hu: np.ndarray, lung: np.ndarray, emphysema: np.ndarray, spacing: float, ps: float) -> LungTruth:
    values = hu[lung]
    count = max(1, values.size)
    return LungTruth(
        volume_ml=float(values.size * spacing * ps * ps / 1000.0),
        mean_hu=float(values.mean()) if values.size else 0.0,
        laa950_percent=100.0 * float(np.count_nonzero(values < LAA_HU)) / count,
        perc15_hu=float(np.percentile(values, 15)) if values.size else 0.0,
        emphysema_percent=100.0 * float(np.count_nonzero(emphysema & lung)) / count,
    )


@dataclass(frozen=True)
class SliceHeader:
    """What a synthetic CT slice says about itself besides its pixels and geometry."""

    study_uid: str
    series_uid: str
    frame_uid: str
    study_description: str
    series_description: str
    body_part: str | None = None  # BodyPartExamined; None: absent (Laterality then empty, Type 2C)
    slice_thickness: float = 2.5
    kernel: str = "STANDARD"
    gantry_tilt: float = 0.0
    series_number: int = 1
    model_name: str = "synthetic chest phantom"
    window: tuple[str, str] = ("-600", "1500")  # WindowCenter, WindowWidth
    spacing_between_slices: float | None = None


def write_ct_slice(folder: Path, stored: np.ndarray, position: Sequence[float], orientation: Sequence[float],
                   pixel_spacing: float, number: int, header: SliceHeader,
                   image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")) -> Path:
    """Write one CT slice (stored values = HU - INTERCEPT, uint16 12 bits) named by a new SOP Instance UID.

    No patient data: PatientName "Phantom^Synthetic", PatientID "PHANTOM"."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "radnode"
    ds.ManufacturerModelName = header.model_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "PHANTOM"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    if header.body_part:
        ds.BodyPartExamined = header.body_part
    ds.SliceThickness = f"{header.slice_thickness:g}"
    if header.spacing_between_slices is not None:
        ds.SpacingBetweenSlices = f"{header.spacing_between_slices:g}"
    ds.KVP = "120"
    ds.ConvolutionKernel = header.kernel
    ds.GantryDetectorTilt = f"{header.gantry_tilt:g}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = header.series_number
    if not header.body_part:  # Type 2C: needed (empty = unknown) unless the body part is known unpaired
        ds.Laterality = ""
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.FrameOfReferenceUID = header.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{position[2]:.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{pixel_spacing:.6g}", f"{pixel_spacing:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = header.window
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    ds.RescaleSlope = "1"
    if "LOCALIZER" not in image_type:  # a localizer is a projection: its values are not HU
        ds.RescaleType = "HU"
    ds.PixelData = np.asarray(stored, dtype="<u2").tobytes()
    path = folder / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
