"""Load step, display: the one DICOM-to-display conversion (Modality LUT, VOI LUT or window, MONOCHROME1,
palette and YBR colour) used by the 2-D and frames loaders and by the dashboard's previews."""

from __future__ import annotations

import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from node.imaging.read import ImageLoadError, decode, floats, frame_count, reason

log = logging.getLogger("node.imaging")

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights of R, G, B


def display_pixels(ds: Dataset, *, colour: bool = False) -> np.ndarray:
    """The (first) image of `ds` ready for display: float32 in [0, 1], high = bright.

    Greyscale: Modality LUT, then VOI LUT or window (lowest and highest output of the VOI map to 0 and 1;
    without a VOI the data range is used), MONOCHROME1 inverted: (y, x). Colour (RGB, YBR_* as pydicom and the
    JPEG 2000 decoders convert them, PALETTE COLOR) scaled by its bit depth: (y, x, 3) when `colour`, else
    luminance (y, x). Raises ImageLoadError when the pixel data cannot be decoded, the VOI cannot be applied,
    the palette is malformed, or the photometric interpretation or pixel layout is not supported.
    """
    raw = decode(ds)
    if frame_count(ds) > 1:
        raw = raw[0]
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in GREYSCALE:
        if raw.ndim != 2:
            raise ImageLoadError(f"greyscale pixel data has shape {raw.shape}, expected one 2-D image")
        values = apply_modality_lut(raw, ds)
        low, high = _voi_range(ds)
        if low is None or high is None:  # no VOI: the data range is the display range
            low, high = float(np.min(values)), float(np.max(values))
        else:
            if ds.get("VOILUTSequence") and values.dtype.kind == "f":  # a LUT is indexed by integers
                values = np.rint(values).astype(np.int64)
            try:
                values = apply_voi_lut(values, ds, index=0)
            except (ValueError, NotImplementedError) as exc:  # pydicom's errors for invalid VOI values
                raise ImageLoadError(f"cannot apply the VOI LUT or window: {reason(exc)}") from exc
        scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low) if high > low else np.zeros(raw.shape)
        scaled = np.clip(scaled, 0.0, 1.0)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
        return scaled.astype(np.float32)
    rgb, depth = rgb_pixels(raw, ds, photometric)
    if rgb.ndim != 3:
        raise ImageLoadError(f"colour pixel data has shape {rgb.shape}, expected one 2-D image")
    values = rgb.astype(np.float64) if colour else rgb.astype(np.float64) @ LUMA
    return np.clip(values / (2**depth - 1), 0.0, 1.0).astype(np.float32)


def rgb_pixels(raw: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, int]:
    """RGB pixels (pydicom already converts YBR_FULL/YBR_FULL_422; J2K decoders YBR_ICT/RCT) + bit depth.

    Raises ImageLoadError for a malformed palette or a photometric interpretation that is not colour.
    """
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(raw, ds)
        except Exception as exc:  # malformed palettes raise ValueError, KeyError, ...: convert here
            log.warning("cannot apply the palette colour lookup table", exc_info=True)
            raise ImageLoadError(f"cannot apply the palette colour lookup table: {reason(exc)}") from exc
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        depth = int(descriptor[2]) if descriptor else 8
        return rgb, 8 if depth <= 8 else 16
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") and raw.shape[-1] == 3:
        return raw, int(ds.get("BitsStored", 8))
    raise ImageLoadError(f"photometric interpretation {photometric or '(none)'} is not supported")


def _voi_range(ds: Dataset) -> tuple[float | None, float | None]:
    """Lowest and highest output of the VOI transform pydicom applies (apply_voi_lut), or (None, None)."""
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None, None
    modality_lut = ds.get("ModalityLUTSequence")
    bits = int(ds.get("BitsStored", 16))
    if modality_lut:
        low, high = 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = floats(ds.get("RescaleSlope"), 1)
    intercept = floats(ds.get("RescaleIntercept"), 1)
    if slope and intercept:
        low, high = low * slope[0] + intercept[0], high * slope[0] + intercept[0]
    return min(low, high), max(low, high)
