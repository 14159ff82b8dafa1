"""Load step (plugin input, the router's lung check, the dashboard's previews): one stored series ->
`plugins.base.Image`.

`load_image` reads the instances of ONE series (`read`) and builds what a plugin receives:

- "volume" (`volume`: CT; MR/PT slices with ImagePositionPatient/ImageOrientationPatient; enhanced
  multi-frame with per-frame geometry): float32 (z, y, x) after the Modality LUT (HU for CT), slices sorted
  by position along the slice normal, series quality checks in `Image.warnings`;
- "image2d" (`image2d`: CR, DX, MG, OT/SC): float32 (y, x) in [0, 1] for display (`display`): Modality LUT,
  then VOI LUT or window (lowest and highest output of the VOI map to 0 and 1; without a VOI the data range
  is used), MONOCHROME1 inverted so that high = bright; colour images become luminance;
- "frames" (`frames`: US): uint8 (n, y, x) grey or (n, y, x, 3) RGB, one source per frame.

`read_series` + `sample_volume` read a cheap, evenly spaced subset of a volume (the router's lung check);
`display_pixels` is the one DICOM-to-display conversion. Errors are `ImageLoadError` with a PHI-free message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from node.imaging.display import display_pixels
from node.imaging.frames import load_frames
from node.imaging.image2d import load_image2d
from node.imaging.read import (
    FRAMES_MODALITIES,
    IMAGE2D_MODALITIES,
    SUPPORTED_MODALITIES,
    VOLUME_MODALITIES,
    ImageLoadError,
    Series,
    read_series,
)
from node.imaging.volume import SliceQuality, VolumeSample, load_volume, quality_warnings, sample_volume
from node.logs import uid_hash
from plugins.base import Image

__all__ = [
    "FRAMES_MODALITIES",
    "IMAGE2D_MODALITIES",
    "SUPPORTED_MODALITIES",
    "VOLUME_MODALITIES",
    "ImageLoadError",
    "Series",
    "SliceQuality",
    "VolumeSample",
    "display_pixels",
    "load_image",
    "quality_warnings",
    "read_series",
    "sample_volume",
]

log = logging.getLogger(__name__)


def load_image(paths: Sequence[Path], *, min_slices: int = 10) -> Image:
    """Read the stored instances of ONE series and build the plugin input, with quality warnings.

    Raises ImageLoadError when a file is not readable DICOM, the files hold more than one series or
    modality, no instance has pixel data, an image lacks SOP class/instance UID, Rows or Columns, the
    modality is not supported, no CT/MR/PT slice has position and orientation, a multi-frame image has no
    per-frame geometry, or the pixel data cannot be decoded (the message names the transfer syntax).
    """
    series = read_series(paths)
    if series.modality in VOLUME_MODALITIES:
        image = load_volume(series, min_slices)
    elif series.modality in IMAGE2D_MODALITIES:
        image = load_image2d(series)
    else:
        image = load_frames(series)
    log.debug(
        "series %s loaded: %s %s %s, %d warning(s)",
        uid_hash(series.series_uid),
        series.modality,
        image.kind,
        image.pixels.shape,
        len(image.warnings),
    )
    return image
