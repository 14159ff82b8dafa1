"""Reference plugin (a template and the test workhorse): CT voxels above a HU threshold. Not a clinical model.

Its manifest is importable without numpy-heavy code; the model itself lives in `model.py`. The
threshold is its "weights": `<models dir>/reference-threshold/threshold.safetensors`, a tensor
`threshold_hu` (write one with `write_weights`). Default rules never route to it.
"""

from plugins.base import Code, Manifest, SegmentSpec, SeriesSelection

MANIFEST = Manifest(
    name="reference-threshold",
    version="1.0.0",
    title="Reference thresholding segmenter (template, not for clinical use)",
    factory="plugins.reference_threshold.model:build",
    modalities=["CT"],
    outputs=["SR", "SEG", "SC"],
    segments=[
        SegmentSpec(
            label="above-threshold",
            category=Code(value="85756007", scheme="SCT", meaning="Tissue"),
            type=Code(value="272673000", scheme="SCT", meaning="Bone"),
        )
    ],
    findings=[
        Code(value="118565006", scheme="SCT", meaning="Volume"),
        Code(value="373098007", scheme="SCT", meaning="Mean"),
    ],
    queue="cpu",
    series=SeriesSelection(min_slices=1),
    weights="threshold.safetensors",
    reference_only=True,
)
