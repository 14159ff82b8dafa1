"""us-prostate-seg preprocessing (numpy/scipy): grey, the scan area, the letterbox to the network's square input
and back, Perona-Malik anisotropic diffusion, normalisation.

Per frame, in this order: crop to the scan area, RGB -> grey (luma), letterbox to size x size, diffusion,
normalisation. The same crop and letterbox serve every frame of a series (the probe's image does not move
within a cine), and the letterbox's inverse maps the network's probabilities back onto the frame.

- Grey: ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B, the Y of the YBR_FULL(_422) colour spaces
  ultrasound JPEG uses, so a grey B-mode image keeps its values whichever way it was stored.
- Scan area: the SequenceOfUltrasoundRegions region the calibration comes from (the first 2-D region in
  centimetres, as `node.imaging` takes the spacing from it) when `Image.attrs` carries that sequence (a list
  of dicts keyed by DICOM keywords) and the region lies inside the frame; otherwise the image content: the
  bounding box of the large unsaturated (grey) non-black regions of the frames' maximum (text, calipers,
  logos and tool bars are too thin or too small to count; colour banners and Doppler are saturated).
- Letterbox: the crop is scaled by size / max(height, width) (aspect ratio kept, so a round gland stays
  round) and centred, the rest of the square is black (like the outside of a sector). Resampling is
  separable linear interpolation with a triangle filter widened by the shrink factor (antialiasing), as
  two matrix products, vectorised over the frames; the inverse uses the same mapping the other way.
- Diffusion: Perona & Malik (1990), 4 neighbours, zero flux across the border, conduction
  exp(-(|d|/kappa)^2) (option 1, favours high-contrast edges) or 1 / (1 + (|d|/kappa)^2) (option 2, favours
  wide regions); kappa in grey levels (0..255); gamma <= 0.25 keeps the explicit scheme stable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy import ndimage

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
BLACK_LEVEL = 16  # grey levels at or below this are background (JPEG noise on black stays below it)
MAX_CHROMA = 24  # max(R, G, B) - min(R, G, B) above this is colour (banners, Doppler, annotations)
MIN_CONTENT_SHARE = 0.02  # largest content region below this share of the frame: use the whole frame
MIN_PART_SHARE = 0.1  # content regions at least this share of the largest belong to the image (split screens,
# tissue bands cut off by a black bladder); smaller ones are text blocks, grey bars and logos
MIN_PART_SIDE = 0.1  # ... unless thinner than this share of the frame's shorter side (tool bars, scales)
TISSUE_FORMAT = 1  # RegionSpatialFormat 2D
CENTIMETRE = 3  # PhysicalUnitsX/YDirection cm


@dataclass(frozen=True)
class Box:
    """A crop of the frame, half-open: rows y0..y1-1, columns x0..x1-1."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class ScanArea:
    """The crop and where it came from ("region" or "content"); `spacing_trusted` is False when the
    calibrated region does not fit the frame (the pixels were resized after calibration)."""

    box: Box
    source: str
    spacing_trusted: bool = True
    warnings: list[str] = field(default_factory=list)


def to_grey(frames: np.ndarray) -> np.ndarray:
    """(n, y, x) grey or (n, y, x, 3) RGB -> float32 (n, y, x) luma in the input's range. Raises ValueError."""
    if frames.ndim == 4 and frames.shape[-1] == 3:
        return np.tensordot(frames.astype(np.float32, copy=False), LUMA, axes=([3], [0]))
    if frames.ndim == 3:
        return frames.astype(np.float32)
    raise ValueError(f"frames must be (n, y, x) or (n, y, x, 3), got shape {frames.shape}")


def scan_area(pixels: np.ndarray, attrs: Mapping[str, Any]) -> ScanArea:
    """The part of the frames the network sees: the calibrated ultrasound region when `attrs` carries
    SequenceOfUltrasoundRegions and it fits the frame, else `content_box`. `pixels` (n, y, x[, 3]) in
    0..255. Raises nothing: an unusable region falls back to the content, with a warning."""
    rows, cols = pixels.shape[1:3]
    regions = attrs.get("SequenceOfUltrasoundRegions") or []
    planar = [r for r in regions if _int(r.get("RegionSpatialFormat")) == TISSUE_FORMAT]
    calibrated = [r for r in planar if _int(r.get("PhysicalUnitsXDirection")) == CENTIMETRE
                  and _int(r.get("PhysicalUnitsYDirection")) == CENTIMETRE]
    warnings = []
    if len(planar) > 1:
        warnings.append(f"{len(planar)} 2-D ultrasound regions (a split screen): only the first calibrated one "
                        "is segmented")
    if calibrated:
        region = calibrated[0]
        bounds = [_int(region.get(k)) for k in ("RegionLocationMinY0", "RegionLocationMinX0",
                                                  "RegionLocationMaxY1", "RegionLocationMaxX1")]
        if None not in bounds:
            y0, x0, y1, x1 = bounds
            # Max values are inclusive; some vendors write the exclusive end (MaxX1 = Columns): tolerated
            if 0 <= y0 < y1 <= rows and 0 <= x0 < x1 <= cols:
                return ScanArea(Box(y0, x0, min(y1 + 1, rows), min(x1 + 1, cols)), "region", True, warnings)
        warnings.append(f"the calibrated ultrasound region ({_describe(bounds)}) does not lie inside the "
                        f"{rows}x{cols} frame (resized after calibration?): areas not reported")
        return ScanArea(content_box(pixels), "content", False, warnings)
    return ScanArea(content_box(pixels), "content", True, warnings)


def content_box(pixels: np.ndarray) -> Box:
    """Bounding box of the large grey (unsaturated), non-black regions of the frames' maximum (the largest,
    and those of at least MIN_PART_SHARE of its size that are not thin strips), or the whole frame when the
    largest covers less than MIN_CONTENT_SHARE of it. `pixels` (n, y, x[, 3]) in 0..255.

    A pixel belongs to the region where at least half of the window of about 1 % of the frame around it is
    grey and non-black (dark speckle inside tissue does not break the region, thin text does not make
    one), after an opening with that window (thin lines joining text to the image are cut)."""
    peak = pixels.max(axis=0)
    if peak.ndim == 3:
        high, low = peak.max(axis=-1).astype(np.int16), peak.min(axis=-1).astype(np.int16)
        on = (high > BLACK_LEVEL) & (high - low <= MAX_CHROMA)
    else:
        on = peak > BLACK_LEVEL
    rows, cols = on.shape
    k = max(3, int(round(min(rows, cols) / 100)) | 1)
    # speckle leaves dark pixels inside tissue: keep where most of a k x k window is grey content, then
    # open with the same window to cut thin bridges (calipers, dotted lines) to the text around
    dense = ndimage.uniform_filter(on.astype(np.float32), size=k) >= 0.5
    opened = ndimage.binary_opening(dense, structure=np.ones((k, k), dtype=bool))
    labels, count = ndimage.label(opened)
    whole = Box(0, 0, rows, cols)
    if count == 0:
        return whole
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(sizes.max())
    if largest < MIN_CONTENT_SHARE * rows * cols:
        return whole
    thin = MIN_PART_SIDE * min(rows, cols)
    parts = [box for label, box in enumerate(ndimage.find_objects(labels), start=1)
             if box is not None and (sizes[label] == largest or (
                 sizes[label] >= MIN_PART_SHARE * largest and min(s.stop - s.start for s in box) >= thin))]
    return Box(min(p[0].start for p in parts), min(p[1].start for p in parts),
               max(p[0].stop for p in parts), max(p[1].stop for p in parts))


@dataclass(frozen=True)
class Letterbox:
    """A height x width crop scaled by `scale` = size / max(height, width) and centred in a size x size square."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def pad(self) -> tuple[float, float]:
        """(rows, columns) of black before the content, in model pixels (may be fractional)."""
        return (self.size - self.height * self.scale) / 2.0, (self.size - self.width * self.scale) / 2.0

    @cached_property
    def _forward(self) -> tuple[np.ndarray, np.ndarray]:
        pad_y, pad_x = self.pad
        return (resample_matrix(self.size, self.height, self.scale, pad_y),
                resample_matrix(self.size, self.width, self.scale, pad_x))

    @cached_property
    def _inverse(self) -> tuple[np.ndarray, np.ndarray]:
        pad_y, pad_x = self.pad
        return (resample_matrix(self.height, self.size, 1.0 / self.scale, -pad_y / self.scale),
                resample_matrix(self.width, self.size, 1.0 / self.scale, -pad_x / self.scale))

    def to_model(self, crops: np.ndarray) -> np.ndarray:
        """(n, height, width) -> float32 (n, size, size); outside the content 0."""
        ry, rx = self._forward
        return (ry @ crops.astype(np.float32, copy=False) @ rx.T).astype(np.float32, copy=False)

    def to_frame(self, maps: np.ndarray) -> np.ndarray:
        """(n, size, size) -> float32 (n, height, width): the inverse mapping of `to_model`."""
        ry, rx = self._inverse
        return (ry @ maps.astype(np.float32, copy=False) @ rx.T).astype(np.float32, copy=False)

    def point_to_model(self, y: float, x: float) -> tuple[float, float]:
        """A pixel centre of the crop -> its position in the model's square (pixel-centre coordinates)."""
        pad_y, pad_x = self.pad
        return (y + 0.5) * self.scale + pad_y - 0.5, (x + 0.5) * self.scale + pad_x - 0.5


def resample_matrix(n_out: int, n_in: int, scale: float, offset: float) -> np.ndarray:
    """(n_out, n_in) float32 weights of separable linear resampling where an input edge coordinate e maps
    to e * scale + offset. A triangle filter of half-width max(1, 1/scale) input pixels (antialiased when
    shrinking), normalised over the input pixels that exist; output pixels whose centre falls outside the
    input get all-zero weights (the letterbox's black)."""
    centres = (np.arange(n_out, dtype=np.float64) + 0.5 - offset) / scale - 0.5
    support = max(1.0, 1.0 / scale)
    weights = np.clip(1.0 - np.abs(centres[:, None] - np.arange(n_in)[None, :]) / support, 0.0, None)
    inside = (centres >= -0.5) & (centres <= n_in - 0.5)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=(total > 0) & inside[:, None])
    return weights.astype(np.float32)


def anisotropic_diffusion(frames: np.ndarray, iterations: int, kappa: float, gamma: float,
                          option: int) -> np.ndarray:
    """Perona-Malik diffusion of each frame of (n, y, x) (a new float32 array), vectorised over the frames.

    Each iteration adds gamma * sum over the 4 neighbours of c(d) * d, d = neighbour - pixel, with
    c(d) = exp(-(d/kappa)^2) (option 1) or 1 / (1 + (d/kappa)^2) (option 2); no flux across the border.
    Raises ValueError for option not 1 or 2, kappa <= 0, gamma outside (0, 0.25] or iterations < 0."""
    if option not in (1, 2):
        raise ValueError(f"diffusion option must be 1 (exponential) or 2 (quadratic), got {option!r}")
    if kappa <= 0 or not 0 < gamma <= 0.25 or iterations < 0:
        raise ValueError(f"diffusion needs kappa > 0, 0 < gamma <= 0.25 and iterations >= 0 (got kappa {kappa}, "
                         f"gamma {gamma}, iterations {iterations})")
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, y, x), got shape {frames.shape}")
    u = frames.astype(np.float32, copy=True)
    for _ in range(iterations):
        fluxes = []
        for axis in (1, 2):
            d = np.diff(u, axis=axis)  # u[i + 1] - u[i]: what flows into pixel i from pixel i + 1
            c = np.square(d * (1.0 / kappa))
            if option == 1:
                np.exp(np.negative(c, out=c), out=c)
            else:
                c += 1.0
                np.reciprocal(c, out=c)
            c *= d
            c *= gamma
            fluxes.append(c)
        fy, fx = fluxes
        u[:, :-1, :] += fy
        u[:, 1:, :] -= fy
        u[:, :, :-1] += fx
        u[:, :, 1:] -= fx
    return u


def normalise(grey: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Grey levels 0..255 -> (v / 255 - mean) / std, float32."""
    return ((grey * np.float32(1.0 / 255.0) - np.float32(mean)) * np.float32(1.0 / std)).astype(np.float32, copy=False)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a 2-D mask, holes filled (one gland per frame); empty stays empty."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return ndimage.binary_fill_holes(mask) if count else mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _describe(bounds: Sequence[int | None]) -> str:
    y0, x0, y1, x1 = bounds
    return f"rows {y0}-{y1}, columns {x0}-{x1}"
