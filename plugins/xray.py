"""Chest X-ray input geometry shared by the X-ray plugins: letterbox a display-ready grey image onto the square
model input, normalise it (`Std`: the configuration type of its standard deviations), and map a patch-grid map
back onto the original image. numpy, Pillow and pydantic only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from PIL import Image as PILImage
from pydantic import AfterValidator


@dataclass(frozen=True)
class Letterbox:
    """Where an image of `shape` (rows, cols) lies on the `size` x `size` model input: `height` x `width`
    pixels from (`top`, `left`)."""

    shape: tuple[int, int]
    size: int
    top: int
    left: int
    height: int
    width: int


def letterbox(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """The grey image resized (aspect ratio kept, longer side = `size`) and centred on a black `size` x `size`
    canvas: float32 in [0, 1], and where it lies. Raises ValueError for an image that is not 2-D."""
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
    rows, cols = pixels.shape
    scale = size / max(rows, cols)
    height, width = max(1, round(rows * scale)), max(1, round(cols * scale))
    grey = np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float32)), 0.0, 1.0)
    resized = PILImage.fromarray(np.ascontiguousarray(grey)).resize((width, height), PILImage.Resampling.BILINEAR)
    top, left = (size - height) // 2, (size - width) // 2
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[top : top + height, left : left + width] = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    return canvas, Letterbox((rows, cols), size, top, left, height, width)


def _positive(std: tuple[float, float, float]) -> tuple[float, float, float]:
    if min(std) <= 0:
        raise ValueError("std values must be positive")
    return std


Std = Annotated[tuple[float, float, float], AfterValidator(_positive)]  # a configuration's per-channel std


def normalise(canvas: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """A grey (S, S) canvas as the model input: (1, 3, S, S) float32, (grey - mean[c]) / std[c]."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return ((canvas[None, :, :] - m) / s)[None].astype(np.float32)


def _axis_weights(n_out: int, start: int, extent: int, size: int, n_grid: int) -> np.ndarray:
    """(n_out, n_grid) bilinear weights: output pixel k's centre lies at start + (k + 0.5) * extent / n_out on
    the model input, whose `size` pixels hold `n_grid` patches; only patches overlapping the image are used."""
    patch = size / n_grid
    centres = start + (np.arange(n_out) + 0.5) * (extent / n_out)
    first = min(n_grid - 1, int(start // patch))
    last = max(first, min(n_grid - 1, math.ceil((start + extent) / patch) - 1))
    g = np.clip(centres / patch - 0.5, first, last)
    i0 = np.minimum(np.floor(g).astype(np.int64), last)
    i1 = np.minimum(i0 + 1, last)
    frac = g - i0
    weights = np.zeros((n_out, n_grid), dtype=np.float64)
    k = np.arange(n_out)
    np.add.at(weights, (k, i0), 1.0 - frac)
    np.add.at(weights, (k, i1), frac)
    return weights


def grid_to_image(grid: np.ndarray, box: Letterbox) -> np.ndarray:
    """A patch-grid map (grid rows, grid cols) over the model input as a float64 map of the original image's
    shape: bilinear interpolation from the patch centres, resize and padding undone, only the patches that
    overlap the image used (padding never bleeds in). Raises ValueError for a map that is not 2-D."""
    if grid.ndim != 2:
        raise ValueError(f"expected a 2-D patch grid, got shape {grid.shape}")
    rows, cols = box.shape
    wy = _axis_weights(rows, box.top, box.height, box.size, grid.shape[0])
    wx = _axis_weights(cols, box.left, box.width, box.size, grid.shape[1])
    return wy @ np.asarray(grid, dtype=np.float64) @ wx.T


def heatmap_to_image(grid: np.ndarray, box: Letterbox) -> np.ndarray:
    """`grid_to_image`, then min-max scaled to [0, 1] as float32 (all zero when the map is flat)."""
    heat = grid_to_image(grid, box)
    low, high = float(heat.min()), float(heat.max())
    if not np.isfinite(high - low) or high - low <= 1e-9 * max(1.0, abs(high)):
        return np.zeros(box.shape, dtype=np.float32)
    return ((heat - low) / (high - low)).astype(np.float32)
