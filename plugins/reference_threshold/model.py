"""Reference plugin model: segment CT voxels at or above a HU threshold read from its weights file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from plugins.base import Code, Findings, Heatmap, Image, Manifest, Measurement, Plugin, Segmentation, WeightsUnavailable

VOLUME = Code(value="118565006", scheme="SCT", meaning="Volume")
MEAN = Code(value="373098007", scheme="SCT", meaning="Mean")
MIN_COMPONENT_VOXELS = 8


def write_weights(path: Path, threshold_hu: float) -> Path:
    """Write a weights file for this plugin (a safetensors file with one tensor, `threshold_hu`)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"threshold_hu": np.array([threshold_hu], dtype=np.float32)}, str(path))
    return path


class ThresholdSegmenter(Plugin):
    """Voxels >= threshold HU, small specks removed; volume (mL) and mean HU of the segment."""

    threshold_hu: float

    def load(self, device: str, weights: Path | None) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if weights is None or not weights.is_file():
            raise WeightsUnavailable(f"weights file {weights} not found")
        try:
            tensors = load_file(str(weights))
            self.threshold_hu = float(tensors["threshold_hu"].reshape(-1)[0])
        except (SafetensorError, KeyError, IndexError, OSError) as exc:
            raise WeightsUnavailable(f"{weights}: not a reference-threshold weights file ({exc})") from exc

    def run(self, image: Image) -> Findings:
        if image.kind != "volume":
            return Findings.not_applicable_because(f"needs a CT volume, got {image.kind}")
        hu = image.pixels
        mask = hu >= self.threshold_hu
        labels, n = ndimage.label(mask)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= MIN_COMPONENT_VOXELS
            keep[0] = False
            mask = keep[labels]
        voxel_ml = float(np.prod(image.spacing)) / 1000.0
        volume_ml = float(np.count_nonzero(mask)) * voxel_ml
        label = self.manifest.segments[0].label
        measurements = [Measurement(VOLUME, round(volume_ml, 3), "mL", label)]
        if volume_ml > 0:
            measurements.append(Measurement(MEAN, round(float(hu[mask].mean()), 2), "[hnsf'U]", label))
        heat = np.clip((hu - self.threshold_hu) / 1000.0, 0.0, 1.0).astype(np.float32)
        return Findings(
            segmentations=[Segmentation(label, mask)],
            measurements=measurements,
            heatmaps=[Heatmap("above-threshold", heat, quantity="HU above threshold / 1000")],
            summary=f"{volume_ml:.1f} mL at or above {self.threshold_hu:g} HU",
        )


def build(manifest: Manifest) -> ThresholdSegmenter:
    return ThresholdSegmenter(manifest)
