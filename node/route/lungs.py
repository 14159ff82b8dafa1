"""Route step, the CT lung pixel check: air-filled lungs inside the body before any chest-CT model runs.

A body is HU > -500; air is HU < -400 (lung parenchyma is about -850 HU). Adult lungs hold 2.5-6 l of air at
CT and a small child's still about 0.5 l; the whole air inside a head (paranasal sinuses, mastoids, nasal
cavity, pharynx) stays well below 150 ml. LUNG_MIN_ML = 300 ml (plugins/lungs.py) separates the two with
margin on both sides, and a chest scan that covers only part of the lungs passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.imaging import read_series, sample_volume
from plugins.base import Image
from plugins.lungs import internal_air


@dataclass(frozen=True)
class LungCheck:
    """Result of the CT lung check: found when the internal air volume reaches LUNG_MIN_ML."""

    found: bool
    volume_ml: float
    reason: str


def check_lungs(image: Image) -> LungCheck:
    """CT pixel check: air-filled lungs inside the body (used before any chest-CT model runs).

    Body = largest connected region of HU > -500 in each slice, holes filled; internal air = HU < -400
    inside it (air connected to the outside in the slice plane is excluded), pockets under 1 ml removed.
    Found when that volume is at least LUNG_MIN_ML (300 ml). An image that is not a CT volume is
    reported as not found. Raises nothing.
    """
    if image.kind != "volume" or image.modality != "CT":
        return LungCheck(False, 0.0, f"not a CT volume ({image.modality} {image.kind})")
    dz, dy, dx = (float(s) for s in image.spacing)
    slabs = np.full(image.pixels.shape[0], dz)
    return _lung_check(image.pixels, dy * dx, slabs)


def check_lungs_in_files(paths: Sequence[Path], max_slices: int = 24) -> LungCheck:
    """Same check reading only an evenly spaced subset of at most max_slices slices (and it may downsample
    in-plane 2x) so the router can run it cheaply in the node process.

    Each sampled slice stands for the slab between it and its neighbours' midpoints, so the volume
    estimate covers the whole series. A series that is not CT is reported as not found.
    Raises ImageLoadError for the same reasons as `load_image`, and ValueError when max_slices < 1.
    """
    if max_slices < 1:
        raise ValueError("max_slices must be at least 1")
    series = read_series(paths)
    if series.modality != "CT":
        return LungCheck(False, 0.0, f"not a CT series (modality {series.modality})")
    sample = sample_volume(series, max_slices)
    hu = sample.pixels
    dy, dx = sample.pixel_spacing
    if hu.shape[1] >= 256 and hu.shape[2] >= 256:
        rows, cols = hu.shape[1] // 2 * 2, hu.shape[2] // 2 * 2
        hu = hu[:, :rows, :cols].reshape(len(hu), rows // 2, 2, cols // 2, 2).mean(axis=(2, 4))
        dy, dx = 2 * dy, 2 * dx
    return _lung_check(hu, dy * dx, sample.slabs_mm)


def _lung_check(hu: np.ndarray, pixel_area_mm2: float, slabs_mm: np.ndarray) -> LungCheck:
    """Internal air volume of a HU stack whose slice i stands for a slab of `slabs_mm[i]` mm."""
    found = internal_air(hu, pixel_area_mm2 * np.asarray(slabs_mm, dtype=float) / 1000.0)
    volume_ml = found.volume_ml
    if found.lungs:
        return LungCheck(True, volume_ml, f"air-filled lungs found ({volume_ml:.0f} ml)")
    return LungCheck(False, volume_ml, f"no air-filled lungs inside the body ({volume_ml:.0f} ml of internal air)")
