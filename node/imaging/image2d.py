"""Load step, 2-D images (CR, DX, MG, OT/SC): the first image of the series for display, float32 (y, x) in
[0, 1], high = bright; colour images become luminance."""

from __future__ import annotations

from node.imaging.display import display_pixels
from node.imaging.read import ImageLoadError, Series, frame_count, header_attrs, instance_number, positive_pair
from plugins.base import Image, SourceRef


def load_image2d(series: Series) -> Image:
    """The "image2d" Image of the series' first image by InstanceNumber (a warning when there are more).

    Raises ImageLoadError for a multi-frame image and for pixel data `display_pixels` cannot show.
    """
    warnings = list(series.warnings)
    ordered = sorted(series.datasets, key=instance_number)
    ds = ordered[0]
    if len(ordered) > 1:
        warnings.append(f"series has {len(ordered)} images; used the first by InstanceNumber")
    if frame_count(ds) > 1:
        raise ImageLoadError(f"multi-frame {series.modality} images are not supported as a 2-D image")
    if str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING":
        warnings.append("image is FOR PROCESSING (raw detector data, not for presentation)")
    pixels = display_pixels(ds)
    spacing = positive_pair(ds.get("PixelSpacing")) or positive_pair(ds.get("ImagerPixelSpacing"))
    if spacing is None:
        warnings.append("pixel spacing unknown")
        spacing = (1.0, 1.0)
    attrs = header_attrs(ds)
    attrs["PixelSpacing"] = list(spacing)
    return Image(
        kind="image2d",
        pixels=pixels,
        spacing=spacing,
        sources=(SourceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID)),),
        modality=series.modality,
        warnings=tuple(warnings),
        attrs=attrs,
    )
