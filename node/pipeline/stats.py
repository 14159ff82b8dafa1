"""Infer step, monitoring: what the loader saw of a series (scanner, geometry, intensities), recorded on the job
so drift in the inputs shows per plugin, scanner and week. No patient data: the loader's attrs carry none."""

from __future__ import annotations

from typing import Any

import numpy as np

from plugins.base import Image

# Fixed bin edges per image kind, so histograms of different weeks and scanners compare bin by bin.
HISTOGRAM_EDGES: dict[str, list[float]] = {
    "volume": [-1024, -950, -900, -800, -700, -500, -300, -100, -50, 0, 50, 100, 200, 400, 700, 1000, 3000],
    "image2d": [round(i / 16, 4) for i in range(17)],
    "frames": [i * 16 for i in range(17)],
}
_MAX_SAMPLE = 2_000_000  # voxels: the statistics of a 300-slice CT from a strided sample take milliseconds


def _number(value: Any) -> float | None:
    try:
        return round(float(value[0] if isinstance(value, list | tuple) else value), 4)
    except (TypeError, ValueError, IndexError):
        return None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return "\\".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def input_stats(image: Image) -> dict[str, Any]:
    """Scanner, geometry and an intensity summary of a loaded series (HU for CT, display values 0..1 for X-ray,
    grey levels for ultrasound), with a histogram over HISTOGRAM_EDGES[image.kind]."""
    a = image.attrs
    pixels = np.asarray(image.pixels)
    if image.kind == "frames" and pixels.ndim == 4:  # RGB ultrasound: grey level
        pixels = pixels.mean(axis=-1)
    flat = pixels.reshape(-1)
    sample = flat[:: max(1, flat.size // _MAX_SAMPLE)].astype(np.float32)
    edges = HISTOGRAM_EDGES[image.kind]
    counts, _ = np.histogram(np.clip(sample, edges[0], edges[-1]), bins=edges)
    p01, p50, p99 = (np.percentile(sample, [1, 50, 99]) if sample.size else (0.0, 0.0, 0.0))
    spacing = a.get("PixelSpacing")
    return {
        "manufacturer": _text(a.get("Manufacturer")), "model": _text(a.get("ManufacturerModelName")),
        "station": _text(a.get("StationName")), "modality": image.modality,
        "slice_thickness": _number(a.get("SliceThickness")), "kernel": _text(a.get("ConvolutionKernel")),
        "pixel_spacing": [_number(v) for v in spacing[:2]] if isinstance(spacing, list | tuple) and len(spacing) >= 2
        else None,
        "slices": int(len(image.sources)), "rows": int(pixels.shape[-2]), "columns": int(pixels.shape[-1]),
        "intensity": {"mean": round(float(sample.mean()), 3) if sample.size else 0.0,
                      "std": round(float(sample.std()), 3) if sample.size else 0.0,
                      "p01": round(float(p01), 3), "p50": round(float(p50), 3), "p99": round(float(p99), 3)},
        "histogram": {"edges": edges, "counts": [int(c) for c in counts]},
    }
