"""The chest check shared by the router (node.route.lungs) and the chest-CT plugins: the body on each slice and
the air inside it. Air-filled lungs inside the body mean a chest; a head or an abdomen holds little air.
numpy/scipy only; imports nothing from the node."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BODY_HU = -500.0  # body (soft tissue, bone) vs outside air
AIR_HU = -400.0  # lung parenchyma and air vs soft tissue
MIN_AIR_COMPONENT_ML = 1.0  # smaller internal air pockets are noise or bowel/vessel partial volume
LUNG_MIN_ML = 300.0  # the air of a head stays well below it, a child's lungs well above


@dataclass(frozen=True)
class InternalAir:
    """Air inside the body of a HU stack: its volume (components of at least MIN_AIR_COMPONENT_ML) and
    the union over slices of the body outline (None where no slice shows a body)."""

    volume_ml: float
    body: np.ndarray | None

    @property
    def lungs(self) -> bool:
        return self.volume_ml >= LUNG_MIN_ML


def internal_air(hu: np.ndarray, voxel_ml: np.ndarray | float) -> InternalAir:
    """Body = the largest region above BODY_HU on each slice, holes filled; internal air = body below AIR_HU.

    `voxel_ml`: the volume of one voxel, or one per slice (a subset of slices standing for slabs)."""
    air = np.zeros(hu.shape, dtype=bool)
    union = np.zeros(hu.shape[1:], dtype=bool)
    for z in range(hu.shape[0]):
        labels, count = ndimage.label(hu[z] > BODY_HU)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        body = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
        union |= body
        air[z] = body & (hu[z] < AIR_HU)
    labels, count = ndimage.label(air)
    volume_ml = 0.0
    if count:
        per_voxel = np.broadcast_to(np.reshape(np.asarray(voxel_ml, dtype=float), (-1, 1, 1)), hu.shape)
        component_ml = np.asarray(ndimage.sum_labels(per_voxel, labels, index=np.arange(1, count + 1)))
        volume_ml = float(component_ml[component_ml >= MIN_AIR_COMPONENT_ML].sum())
    return InternalAir(round(volume_ml, 1), union if union.any() else None)
