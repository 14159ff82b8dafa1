"""Lung quantification model: segment the lungs of a chest CT by HU thresholds and morphology, then measure.

Pipeline (numpy/scipy only, no weights), run on a coarse grid of about 1.5 mm in-plane and 2.5 mm between
slices and refined at full resolution:

1. body = the largest 3-D region above -500 HU after a 3 mm in-plane opening (which cuts the table and
   blankets off), holes filled slice by slice; air outside the body and inside the table is never lung;
2. air inside the body = below -400 HU;
3. trachea = an air region of trachea size near the left-right centre of the body in the top slices;
   the airway tree is grown from it below a HU threshold raised step by step (-980 .. -920 HU) while the
   grown volume stays airway sized and grows smoothly (explosion control), then removed with a 1-voxel
   margin: this cuts the trachea and main bronchi off and disconnects the lungs from each other;
4. right and left lung = the largest air component on each side of the midline (in patient coordinates
   from the image direction: +x is the patient's left); lungs that touch are split along the thinnest
   junction by a distance transform (or along the midline when they are fused wide); each lung is
   closed (4 mm) and filled slice by slice so vessels count as lung;
5. at full resolution a lung is its coarse interior plus the voxels below -400 HU in a one-voxel band
   around it, the airways excluded; low-attenuation areas = lung voxels below -950 HU.

Measurements per lung and for both lungs: volume (mL), mean lung density (HU), LAA-950 (% of lung
voxels below -950 HU), Perc15 (15th percentile of lung HU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from plugins.base import (
    Findings,
    Heatmap,
    Image,
    Manifest,
    Measurement,
    NotApplicable,
    Plugin,
    Prior,
    Segmentation,
)
from plugins.lung_quant import (
    BOTH_LUNGS,
    LAA_950,
    LAA_950_CHANGE,
    LEFT_LUNG,
    LOW_ATTENUATION,
    MEAN_LUNG_DENSITY,
    PERC_15,
    RIGHT_LUNG,
    VOLUME,
    VOLUME_CHANGE,
)

BODY_HU = -500.0  # body (soft tissue, bone) vs outside air; matches node.route.lungs' lung check
AIR_HU = -400.0  # lung parenchyma and air vs soft tissue
LAA_HU = -950.0  # low-attenuation areas (emphysema index LAA-950)
# Airway growing: thresholds tried in turn (lung parenchyma lies around -850 HU: stay well below it).
AIRWAY_THRESHOLDS_HU = (-980.0, -960.0, -940.0, -920.0)
MAX_AIRWAY_ML = 250.0  # trachea + bronchi grown beyond this have leaked into the lungs
AIRWAY_MIN_ML = 5.0  # a grown airway this small is only part of the trachea: keep growing regardless
AIRWAY_JUMP = (0.25, 10.0)  # a step that adds more than 25 % and 10 mL to a trachea-sized airway leaks
TRACHEA_AREA_MM2 = (40.0, 1000.0)  # lumen cross-section of a trachea (child to adult, some margin)
TRACHEA_MAX_OFFSET_MM = 30.0  # from the body's left-right centre
TRACHEA_SEARCH_MM = 120.0  # how far down from the top slice the trachea is looked for
TRACHEA_MAX_HU = -900.0  # mean HU of a trachea cross-section (lumen air)
MIN_SLICES = 10
MIN_LUNG_ML = 50.0  # one lung (a child's lung is larger)
LUNGS_MIN_ML = 300.0  # both lungs together: matches plugins.lungs.LUNG_MIN_ML
COARSE_MM = 1.5  # target in-plane spacing of the working grid
COARSE_Z_MM = 2.5  # target slice spacing of the working grid
MAX_COARSE_VOXELS = 8_000_000  # keeps a run within seconds
GAS_LAA_SHARE = 0.85  # an air region with more of its voxels below -950 HU is gas (bowel, stomach), not lung
BODY_OPENING_MM = 3.0
CLOSING_MM = 4.0
FUSED_SIDE_FRACTION = 0.2  # a component with at least this share on each side of the midline = both lungs
SPLIT_DEPTHS_MM = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0)  # erosion depths tried
SPLIT_MIN_SHARE = 0.1  # each part of a split holds at least this share of the component
MAX_AXIAL_TILT_COS = 0.7  # |slice normal . z| below this: not an axial series
THICK_SLICE_MM = 1.5
CUT_OFF_AREA_MM2 = 300.0  # lung cross-section on the first/last slice that means "lungs cut off"
HEATMAP_WINDOW_MM = 15.0  # neighbourhood of the local LAA fraction

# Reconstruction kernels that sharpen the image (noise and edge overshoot raise LAA-950 and lower Perc15);
# emphysema indices are calibrated on smooth/standard kernels (e.g. Siemens B31f/B35f, GE STANDARD,
# Philips B, Canon FC12 as in the COPDGene and QIBA lung density protocols). Vendor naming:
# - any vendor: names containing LUNG, BONE, SHARP, EDGE, CHEST, ULTRA (GE LUNG, BONE, BONEPLUS, EDGE, CHEST,
#   ULTRA; Canon, United Imaging and others spell "LUNG", "BONE", "SHARP"); GE SOFT/STANDARD/DETAIL are not;
# - Siemens: a letter (+ optional letter), a sharpness number and a suffix (B31f, Br40d, Bl57, Hr64, I50f, Qr59):
#   number >= 50 is sharp (B50f-B80f, Br59+, Bl57+);
# - Canon/Toshiba: FCnn with nn >= 30 (FC30-FC35 bone, FC50-FC56 lung, FC80-FC86 high resolution), and the
#   FLnn lung kernels; FC01-FC18 (body) and FC20-FC28 (head) are not;
# - Philips: C, D, E, L (lung) and the Y-series (YA-YF) and E-series (EA-EC); A, B, UB are smooth.
_SHARP_WORDS = re.compile(r"LUNG|BONE|SHARP|EDGE|CHEST|ULTRA")
_SIEMENS = re.compile(r"^[A-Z][A-Z]?(\d{2})[A-Z]?$")
_CANON = re.compile(r"^F([CL])(\d{1,2})$")
_PHILIPS_SHARP = re.compile(r"^(C|D|E|L|Y[A-F]|E[A-C])$")


@dataclass(frozen=True)
class LungStats:
    """The measurements of one lung (or both)."""

    volume_ml: float
    mean_hu: float
    laa950_percent: float
    perc15_hu: float


@dataclass(frozen=True)
class LungMasks:
    """Full-resolution masks and what the segmentation noticed on the way."""

    right: np.ndarray
    left: np.ndarray
    airway_found: bool


class LungQuant(Plugin):
    """Lungs by HU thresholds and morphology; per-lung and total volume, MLD, LAA-950, Perc15."""

    def load(self, device: str, weights: Path | None) -> None:
        """Nothing to load: the model has no weights and runs on the CPU. Raises nothing."""

    def run(self, image: Image) -> Findings:
        try:
            masks = segment_lungs(image)
        except NotApplicable as exc:
            return Findings.not_applicable_because(str(exc))
        hu = image.pixels
        voxel_ml = float(np.prod(image.spacing)) / 1000.0
        right_values, left_values = hu[masks.right], hu[masks.left]
        stats = {
            RIGHT_LUNG: lung_stats(right_values, voxel_ml),
            LEFT_LUNG: lung_stats(left_values, voxel_ml),
        }
        total = lung_stats(np.concatenate([right_values, left_values]), voxel_ml)
        if total is None:
            return Findings.not_applicable_because("no lungs found")
        lungs = masks.right | masks.left
        laa = lungs & (hu < LAA_HU)

        measurements: list[Measurement] = []
        segmentations: list[Segmentation] = []
        for label, mask in ((RIGHT_LUNG, masks.right), (LEFT_LUNG, masks.left)):
            if stats[label] is None:
                continue
            segmentations.append(Segmentation(label, mask))
            measurements += _measurements(stats[label], label)
        # the totals are measured over both lungs: a segment of its own, so that the SR's group for them
        # references a region (TID 1411) like the per-lung groups
        segmentations.append(Segmentation(BOTH_LUNGS, lungs))
        measurements += _measurements(total, BOTH_LUNGS)
        laa_voxels = int(np.count_nonzero(laa))
        if laa_voxels:
            segmentations.append(Segmentation(LOW_ATTENUATION, laa))
            measurements.append(Measurement(VOLUME, round(laa_voxels * voxel_ml, 1), "mL", LOW_ATTENUATION))

        warnings = quality_warnings(image, masks)
        r, le = stats[RIGHT_LUNG], stats[LEFT_LUNG]
        sides = ", ".join(
            f"{name} {s.volume_ml:.0f} mL" for name, s in (("right", r), ("left", le)) if s is not None
        )
        summary = (
            f"Lungs {total.volume_ml:.0f} mL ({sides}); mean lung density {total.mean_hu:.0f} HU; "
            f"LAA-950 {total.laa950_percent:.1f}%; Perc15 {total.perc15_hu:.0f} HU"
        )
        if image.priors:
            change, why = compare_with_prior(total, image.priors[0])
            if change is None:
                warnings.append(why)
            else:
                measurements += [
                    Measurement(VOLUME_CHANGE, round(total.volume_ml - change.volume_ml, 1), "mL", BOTH_LUNGS),
                    Measurement(LAA_950_CHANGE, round(total.laa950_percent - change.laa950_percent, 2), "%",
                                BOTH_LUNGS),
                ]
                summary += (f"; since the prior of {image.priors[0].study_date or 'unknown date'}: lungs "
                            f"{total.volume_ml - change.volume_ml:+.0f} mL, LAA-950 "
                            f"{total.laa950_percent - change.laa950_percent:+.1f} points")
        return Findings(
            segmentations=segmentations,
            measurements=measurements,
            heatmaps=[Heatmap("low-attenuation", laa_heatmap(lungs, laa, image.spacing),
                              quantity="local fraction of lung below -950 HU", unit="%")],
            warnings=warnings,
            summary=summary,
        )


def compare_with_prior(total: LungStats, prior: Prior) -> tuple[LungStats | None, str]:
    """The prior study's whole-lung stats, measured the same way, or None and why not."""
    try:
        masks = segment_lungs(prior.image)
    except NotApplicable as exc:
        return None, f"prior study of {prior.study_date or 'unknown date'} not compared: {exc}"
    hu = prior.image.pixels
    voxel_ml = float(np.prod(prior.image.spacing)) / 1000.0
    stats = lung_stats(hu[masks.right | masks.left], voxel_ml)
    if stats is None:
        return None, f"prior study of {prior.study_date or 'unknown date'} not compared: no lungs found"
    return stats, ""


def build(manifest: Manifest) -> LungQuant:
    return LungQuant(manifest)


# --- measurements ---------------------------------------------------------------------------------


def lung_stats(values: np.ndarray, voxel_ml: float) -> LungStats | None:
    """Volume, mean, LAA-950 and 15th percentile of a lung's HU values; None when there are none."""
    if values.size == 0:
        return None
    return LungStats(
        volume_ml=round(values.size * voxel_ml, 1),
        mean_hu=round(float(values.mean(dtype=np.float64)), 1),
        laa950_percent=round(100.0 * float(np.count_nonzero(values < LAA_HU)) / values.size, 2),
        perc15_hu=round(float(np.percentile(values, 15)), 1),
    )


def _measurements(s: LungStats, segment: str | None) -> list[Measurement]:
    return [
        Measurement(VOLUME, s.volume_ml, "mL", segment),
        Measurement(MEAN_LUNG_DENSITY, s.mean_hu, "[hnsf'U]", segment),
        Measurement(LAA_950, s.laa950_percent, "%", segment),
        Measurement(PERC_15, s.perc15_hu, "[hnsf'U]", segment),
    ]


def laa_heatmap(lungs: np.ndarray, laa: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Local fraction of low-attenuation voxels among the lung voxels within about 15 mm, 0 outside the lungs."""
    factors = _factors(spacing, lungs.shape)
    lung_c = _pool(lungs, factors)
    laa_c = _pool(laa, factors)
    coarse = [s * f for s, f in zip(spacing, factors, strict=True)]
    size = [max(1, int(round(HEATMAP_WINDOW_MM / s)) | 1) for s in coarse]
    num = ndimage.uniform_filter(laa_c, size, mode="constant")
    den = ndimage.uniform_filter(lung_c, size, mode="constant")
    frac = np.divide(num, den, out=np.zeros_like(num), where=den > 0.02)
    heat = _upsample(np.clip(frac, 0.0, 1.0), factors, lungs.shape)
    heat[~lungs] = 0.0
    return heat


def quality_warnings(image: Image, masks: LungMasks) -> list[str]:
    """Thick slices, a sharp kernel, lungs cut off at the top or bottom, one lung or the airways not found."""
    warnings: list[str] = []
    thickness = _float(image.attrs.get("SliceThickness")) or float(image.spacing[0])
    if thickness > THICK_SLICE_MM:
        warnings.append(
            f"slice thickness {thickness:.1f} mm > {THICK_SLICE_MM:.1f} mm: emphysema indices (LAA-950, Perc15) "
            "are calibrated for thin slices"
        )
    kernel = image.attrs.get("ConvolutionKernel")
    if sharp_kernel(kernel, image.attrs.get("Manufacturer")):
        name = "\\".join(kernel) if isinstance(kernel, list | tuple) else str(kernel)
        warnings.append(
            f"sharp reconstruction kernel {name}: LAA-950 is overestimated and Perc15 underestimated "
            "compared with a smooth (standard) kernel"
        )
    pixel_mm2 = float(image.spacing[1]) * float(image.spacing[2])
    lungs = masks.right | masks.left
    top = _top_index(image)
    for index, where in ((top, "top"), (len(lungs) - 1 - top, "bottom")):
        area = float(np.count_nonzero(lungs[index])) * pixel_mm2
        if area > CUT_OFF_AREA_MM2:
            warnings.append(
                f"lungs cut off at the {where} of the scan ({area / 100.0:.0f} cm2 of lung on the {where}-most "
                "slice): volumes are underestimated"
            )
    for mask, name in ((masks.right, "right"), (masks.left, "left")):
        if not mask.any():
            warnings.append(f"no {name} lung found: only one lung is measured")
    if not masks.airway_found:
        warnings.append("trachea not found: the airways could not be separated from the lungs")
    return warnings


def sharp_kernel(kernel: object, manufacturer: object = None) -> bool:
    """Whether a ConvolutionKernel value (one string or several) names a sharp (edge-enhancing) kernel."""
    if kernel is None:
        return False
    names = [str(k).strip().upper() for k in (kernel if isinstance(kernel, list | tuple) else [kernel])]
    philips = "PHILIPS" in str(manufacturer or "").upper()
    for name in names:
        if not name:
            continue
        if _SHARP_WORDS.search(name):
            return True
        siemens, canon = _SIEMENS.match(name), _CANON.match(name)
        if canon:
            return canon.group(1) == "L" or int(canon.group(2)) >= 30
        if siemens and int(siemens.group(1)) >= 50:
            return True
        if (philips or name.startswith("Y")) and _PHILIPS_SHARP.match(name):
            return True
    return False


# --- segmentation ---------------------------------------------------------------------------------


def segment_lungs(image: Image) -> LungMasks:
    """Right and left lung masks at full resolution. Raises NotApplicable when the image is no chest CT
    volume with lungs (not CT, not a volume, too few slices, not axial, no body, no lungs)."""
    if image.kind != "volume":
        raise NotApplicable(f"needs a CT volume, got {image.kind}")
    if image.modality != "CT":
        raise NotApplicable(f"needs CT, got {image.modality}")
    hu = image.pixels
    if hu.ndim != 3 or hu.shape[0] < MIN_SLICES:
        raise NotApplicable(f"needs at least {MIN_SLICES} slices, got {hu.shape[0] if hu.ndim == 3 else 0}")
    direction = np.asarray(image.direction if image.direction is not None else np.eye(3), dtype=np.float64)
    if abs(direction[2][2]) < MAX_AXIAL_TILT_COS:
        raise NotApplicable("needs axial slices (the slice normal is not along the patient's head-feet axis)")
    spacing = tuple(float(s) for s in image.spacing)
    factors = _factors(spacing, hu.shape)
    cs = tuple(s * f for s, f in zip(spacing, factors, strict=True))  # coarse spacing (z, y, x)
    voxel_ml = float(np.prod(cs)) / 1000.0
    hc = _pool(hu, factors)
    geometry = _Geometry(image, factors)

    body = _body(hc, cs)
    air = (hc < AIR_HU) & body
    internal_ml = float(np.count_nonzero(air)) * voxel_ml
    if internal_ml < LUNGS_MIN_ML:
        raise NotApplicable(f"no air-filled lungs inside the body ({internal_ml:.0f} mL of internal air)")
    top = _top_index(image) // factors[0]
    seed = _trachea_seed(hc, air, body, cs, top, geometry)
    if seed is None:  # the midline: through the trachea, else the body's median left-right position
        k, i, j = np.nonzero(body[::2, ::2, ::2])
        midline = float(np.median(geometry.x(2 * k, 2 * i, 2 * j)))
    else:
        midline = float(geometry.x(*seed))
    airway = None if seed is None else _airway(hc, body, cs, seed)
    airway_found = airway is not None
    airway = np.zeros_like(air) if airway is None else ndimage.binary_dilation(airway, iterations=1)
    right_c, left_c = _pick_lungs(hc, air & ~airway, cs, geometry, midline)
    right_c, left_c = (_solidify(m, cs) & ~airway for m in (right_c, left_c))
    overlap = right_c & left_c
    right_c &= ~overlap
    left_c &= ~overlap
    total_ml = float(np.count_nonzero(right_c) + np.count_nonzero(left_c)) * voxel_ml
    if total_ml < LUNGS_MIN_ML:
        raise NotApplicable(f"no lungs found ({total_ml:.0f} mL of lung-like air inside the body)")
    right, left = _refine(hu, right_c, left_c, airway, factors)
    return LungMasks(right=right, left=left, airway_found=airway_found)


class _Geometry:
    """Patient coordinates (LPS, mm) of coarse voxel indices."""

    def __init__(self, image: Image, factors: tuple[int, int, int]) -> None:
        d = np.asarray(image.direction if image.direction is not None else np.eye(3), dtype=np.float64)
        self.origin = np.asarray(image.origin if image.origin is not None else (0.0, 0.0, 0.0), dtype=np.float64)
        sz, sy, sx = (float(s) for s in image.spacing)
        fz, fy, fx = factors
        # coarse index (k, i, j) -> centre of its block in full-resolution indices
        self.offset = np.array([(fz - 1) / 2.0, (fy - 1) / 2.0, (fx - 1) / 2.0])
        self.step = np.array([fz, fy, fx], dtype=np.float64)
        self.axes = np.stack([d[2] * sz, d[1] * sy, d[0] * sx])  # (k, i, j) unit steps in mm, patient space

    def x(self, k: np.ndarray | float, i: np.ndarray | float, j: np.ndarray | float) -> np.ndarray:
        """Patient x (mm, + = the patient's left) of coarse indices."""
        fk, fi, fj = (
            np.asarray(v, dtype=np.float64) * s + o for v, s, o in zip((k, i, j), self.step, self.offset, strict=True)
        )
        return self.origin[0] + fk * self.axes[0, 0] + fi * self.axes[1, 0] + fj * self.axes[2, 0]


def _top_index(image: Image) -> int:
    """Index of the most superior (head-most) slice: patient +z."""
    normal_z = image.direction[2][2] if image.direction is not None else 1.0
    return image.pixels.shape[0] - 1 if normal_z > 0 else 0


def _factors(spacing: tuple[float, ...], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Block sizes (z, y, x) of the working grid: about COARSE_Z_MM x COARSE_MM x COARSE_MM, coarser
    in-plane while the grid would hold more than MAX_COARSE_VOXELS."""
    sz, sy, sx = (float(s) for s in spacing[:3])
    fz = max(1, int(round(COARSE_Z_MM / sz)))
    fy = max(1, int(round(COARSE_MM / sy)))
    fx = max(1, int(round(COARSE_MM / sx)))
    n, rows, cols = shape[:3]
    while -(-n // fz) * -(-rows // fy) * -(-cols // fx) > MAX_COARSE_VOXELS:
        fy, fx = fy + 1, fx + 1
    return fz, fy, fx


def _pool(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block mean (float32; of a mask: the fraction set) over factors (z, y, x); edges padded by repetition."""
    if factors == (1, 1, 1):
        return np.asarray(a, dtype=np.float32)
    pads = [(0, (-n) % f) for n, f in zip(a.shape, factors, strict=True)]
    if any(p for _, p in pads):
        a = np.pad(a, pads, mode="edge")
    z, y, x = a.shape
    fz, fy, fx = factors
    return a.reshape(z // fz, fz, y // fy, fy, x // fx, fx).mean(axis=(1, 3, 5), dtype=np.float32)


def _upsample(a: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse array back to `shape`."""
    for axis, f in enumerate(factors):
        if f > 1:
            a = np.repeat(a, f, axis=axis)
    return a[: shape[0], : shape[1], : shape[2]]


def _disk(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """An in-plane disk (1, h, w) of the given radius for per-slice morphology."""
    ry = max(1, int(round(radius_mm / spacing[1])))
    rx = max(1, int(round(radius_mm / spacing[2])))
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    return (((y * spacing[1]) ** 2 + (x * spacing[2]) ** 2) <= radius_mm**2 + 1e-6)[np.newaxis]


_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_PLANE_CROSS[1] = ndimage.generate_binary_structure(2, 1)


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every slice: background not 4-connected (in-plane) to the slice border."""
    lab, n = ndimage.label(~mask, structure=_PLANE_CROSS)
    if n == 0:
        return mask.copy()
    border = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        border[edge] = True
    border[0] = True
    return mask | ~border[lab]


def _largest(lab: np.ndarray, n: int) -> np.ndarray:
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _body(hc: np.ndarray, cs: tuple[float, ...]) -> np.ndarray:
    """The patient's body: largest 3-D region above -500 HU after an in-plane opening, filled per slice."""
    solid = ndimage.binary_opening(hc > BODY_HU, structure=_disk(BODY_OPENING_MM, cs))
    lab, n = ndimage.label(solid)
    if n == 0:
        raise NotApplicable("no body found in the image")
    return _fill_holes_2d(_largest(lab, n))


def _airway(hc: np.ndarray, body: np.ndarray, cs: tuple[float, ...], seed: tuple[int, int, int]) -> np.ndarray | None:
    """Trachea and bronchi grown from the trachea seed below a rising threshold with explosion control, or
    None when even the strictest threshold leaks."""
    voxel_ml = float(np.prod(cs)) / 1000.0
    best, best_ml = None, 0.0
    for threshold in AIRWAY_THRESHOLDS_HU:
        lab, _ = ndimage.label((hc < threshold) & body)
        label = lab[seed]
        if label == 0:
            continue
        grown = lab == label
        grown_ml = float(np.count_nonzero(grown)) * voxel_ml
        jump = grown_ml - best_ml
        leaked = grown_ml > MAX_AIRWAY_ML or (
            best_ml >= AIRWAY_MIN_ML and jump > max(AIRWAY_JUMP[0] * best_ml, AIRWAY_JUMP[1])
        )
        if leaked:
            break
        best, best_ml = grown, grown_ml
    return best


def _trachea_seed(
    hc: np.ndarray, air: np.ndarray, body: np.ndarray, cs: tuple[float, ...], top: int, geometry: _Geometry
) -> tuple[int, int, int] | None:
    """A voxel inside the trachea: in the top-most slice that has one, the largest round-ish air region of
    trachea size near the body's left-right centre whose mean HU is lumen air."""
    n = hc.shape[0]
    step = -1 if top == n - 1 else 1
    pixel_mm2 = cs[1] * cs[2]
    depth = max(1, int(round(TRACHEA_SEARCH_MM / cs[0])))
    for k in range(top, top + step * min(depth, n), step):
        ii, jj = np.nonzero(body[k])
        if ii.size == 0:
            continue
        xs = geometry.x(k, ii, jj)
        centre = 0.5 * (float(xs.min()) + float(xs.max()))
        lab, count = ndimage.label(air[k])
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        areas = np.bincount(lab.ravel(), minlength=count + 1)[1:] * pixel_mm2
        means = np.asarray(ndimage.mean(hc[k], lab, index))
        ci, cj = (np.asarray(c) for c in zip(*ndimage.center_of_mass(air[k], lab, index), strict=True))
        offsets = np.abs(geometry.x(k, ci, cj) - centre)
        ok = (
            (areas >= TRACHEA_AREA_MM2[0])
            & (areas <= TRACHEA_AREA_MM2[1])
            & (means <= TRACHEA_MAX_HU)
            & (offsets <= TRACHEA_MAX_OFFSET_MM)
        )
        if not ok.any():
            continue
        best = int(index[ok][np.argmax(areas[ok])])
        region = lab == best
        # the seed: the region's darkest voxel (deep in the lumen)
        values = np.where(region, hc[k], np.inf)
        i, j = np.unravel_index(int(np.argmin(values)), values.shape)
        return k, int(i), int(j)
    return None


def _pick_lungs(
    hc: np.ndarray, candidates: np.ndarray, cs: tuple[float, ...], geometry: _Geometry, midline: float
) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) coarse lung masks: the largest air component (of lung size, not gas) on each side of
    the midline (patient x), the two lungs split first when one component spans both sides."""
    voxel_ml = float(np.prod(cs)) / 1000.0
    lab, n = ndimage.label(candidates)
    if n == 0:
        raise NotApplicable("no air-filled lungs inside the body")
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    dark = np.bincount(lab[hc < LAA_HU], minlength=n + 1)
    keep = np.flatnonzero((sizes * voxel_ml >= MIN_LUNG_ML) & (dark < GAS_LAA_SHARE * sizes))
    if keep.size == 0:
        raise NotApplicable(
            f"no lungs found (no internal air region of at least {MIN_LUNG_ML:.0f} mL with lung parenchyma; "
            f"the largest holds {sizes.max() * voxel_ml:.0f} mL)"
        )
    k, i, j = np.nonzero(np.isin(lab, keep))
    xs = geometry.x(k, i, j)
    labels = lab[k, i, j]
    weights = np.bincount(labels, minlength=n + 1)
    x_mean = np.bincount(labels, weights=xs, minlength=n + 1) / np.maximum(weights, 1)
    largest = int(keep[np.argmax(sizes[keep])])
    in_largest = labels == largest
    left_share = float(np.count_nonzero(xs[in_largest] > midline)) / max(1, int(np.count_nonzero(in_largest)))
    if min(left_share, 1.0 - left_share) >= FUSED_SIDE_FRACTION:
        return _split(lab == largest, cs, geometry, midline)
    right = [int(c) for c in keep if x_mean[c] < midline]
    left = [int(c) for c in keep if x_mean[c] >= midline]
    pick_right = lab == max(right, key=lambda c: sizes[c]) if right else np.zeros_like(candidates)
    pick_left = lab == max(left, key=lambda c: sizes[c]) if left else np.zeros_like(candidates)
    return pick_right, pick_left


def _split(
    mask: np.ndarray, cs: tuple[float, ...], geometry: _Geometry, midline: float
) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) parts of one component holding both lungs. Erode it by a growing distance until it
    falls into two large parts on either side of the midline, then give every voxel to the nearer part;
    when it never does, cut it along the midline (patient x)."""
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = np.array([s.start for s in box])
    sub = mask[box]
    dist = ndimage.distance_transform_edt(sub, sampling=cs)
    total = int(np.count_nonzero(sub))
    for depth in SPLIT_DEPTHS_MM:
        lab, n = ndimage.label(dist > depth)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        sizes[0] = 0
        a, b = (int(c) for c in np.argsort(-sizes)[:2])
        if sizes[b] < SPLIT_MIN_SHARE * total:
            continue
        xa, xb = (float(np.mean(geometry.x(*(np.nonzero(lab == c) + offset[:, None])))) for c in (a, b))
        if (xa - midline) * (xb - midline) >= 0:  # two parts of one lung
            continue
        seeds = np.where(lab == a, 1, np.where(lab == b, 2, 0)).astype(np.uint8)
        _, index = ndimage.distance_transform_edt(seeds == 0, sampling=cs, return_indices=True)
        nearest = seeds[tuple(index)]
        right_value = 1 if xa < xb else 2
        right = np.zeros_like(mask)
        right[box] = sub & (nearest == right_value)
        return right, mask & ~right
    k, i, j = np.nonzero(mask)
    on_right = geometry.x(k, i, j) < midline
    right = np.zeros_like(mask)
    right[k[on_right], i[on_right], j[on_right]] = True
    return right, mask & ~right


def _solidify(mask: np.ndarray, cs: tuple[float, ...]) -> np.ndarray:
    """Close (4 mm, in-plane) and fill one lung slice by slice, so vessels and airway walls inside it count."""
    if not mask.any():
        return mask
    disk = _disk(CLOSING_MM, cs)
    pad = (0, disk.shape[1], disk.shape[2])
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(
        slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(box, pad, mask.shape, strict=True)
    )
    sub = np.pad(mask[box], [(0, 0), (pad[1], pad[1]), (pad[2], pad[2])])
    closed = ndimage.binary_closing(sub, structure=disk)[:, pad[1] : -pad[1], pad[2] : -pad[2]]
    out = np.zeros_like(mask)
    out[box] = _fill_holes_2d(closed | mask[box])
    return out


def _refine(
    hu: np.ndarray, right_c: np.ndarray, left_c: np.ndarray, airway_c: np.ndarray, factors: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution lungs: the coarse interior plus the air (< -400 HU) of a one-voxel band around it,
    minus the airways; holes filled per slice."""
    shape = hu.shape
    plane = ndimage.generate_binary_structure(2, 2)[np.newaxis]
    airway = _upsample(airway_c, factors, shape)
    out = []
    coarse = (right_c, left_c)
    for mask in coarse:
        full = np.zeros(shape, dtype=bool)
        if mask.any():
            inner = _upsample(ndimage.binary_erosion(mask, structure=plane), factors, shape)
            outer = _upsample(ndimage.binary_dilation(mask, structure=plane), factors, shape)
            full = inner | (outer & (hu < AIR_HU))
            full &= ~airway
        out.append(full)
    both = out[0] & out[1]
    if both.any():
        own = _upsample(coarse[0], factors, shape)
        out[0] &= ~(both & ~own)
        out[1] &= ~(both & own)
    for index, mask in enumerate(out):
        if mask.any():
            box = ndimage.find_objects(mask.astype(np.uint8))[0]
            filled = _fill_holes_2d(mask[box]) & ~airway[box]
            other = out[1 - index][box]
            mask[box] = filled & ~other
    return out[0], out[1]


def _float(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None
