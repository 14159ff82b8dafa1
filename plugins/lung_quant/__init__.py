"""Chest-CT lung quantification (classical, no weights): lungs, volumes, mean lung density, LAA-950, Perc15.

Its manifest is importable without scipy; the model lives in `model.py`. Codes: SNOMED CT for the
segments (CID 7150 category, CID 7710-style lung laterality), SCT "Volume", DCM "Mean Attenuation
Coefficient" (CID 6141) for the mean lung density; DICOM defines no concept for the emphysema indices
LAA-950 and Perc15, so those use this node's private scheme 99RADNODE.
"""

from plugins.base import Code, Manifest, PriorsSpec, SegmentSpec, SeriesSelection

ANATOMICAL_STRUCTURE = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = Code(value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure")

LEFT_LUNG = "left lung"
RIGHT_LUNG = "right lung"
LOW_ATTENUATION = "low-attenuation areas"
BOTH_LUNGS = "both lungs"

VOLUME = Code(value="118565006", scheme="SCT", meaning="Volume")
MEAN_LUNG_DENSITY = Code(value="112181", scheme="DCM", meaning="Mean Attenuation Coefficient")
LAA_950 = Code(value="LAA950", scheme="99RADNODE", meaning="Percent lung volume below -950 HU (LAA-950)")
PERC_15 = Code(value="PERC15", scheme="99RADNODE", meaning="15th percentile of lung attenuation (Perc15)")
# comparison with the newest prior chest CT (current minus prior): no DICOM concept either
VOLUME_CHANGE = Code(value="LUNGVOLCHG", scheme="99RADNODE", meaning="Change in lung volume since prior study")
LAA_950_CHANGE = Code(value="LAA950CHG", scheme="99RADNODE", meaning="Change in LAA-950 since prior study")

MANIFEST = Manifest(
    name="lung-quant",
    version="1.0.0",
    title="Chest CT lung quantification: lung volumes, mean lung density, LAA-950, Perc15",
    factory="plugins.lung_quant.model:build",
    modalities=["CT"],
    outputs=["SR", "SEG", "SC"],
    segments=[
        SegmentSpec(
            label=LEFT_LUNG,
            category=ANATOMICAL_STRUCTURE,
            type=Code(value="44029006", scheme="SCT", meaning="Left lung"),
        ),
        SegmentSpec(
            label=RIGHT_LUNG,
            category=ANATOMICAL_STRUCTURE,
            type=Code(value="3341006", scheme="SCT", meaning="Right lung"),
        ),
        # where the totals are measured: both lungs together
        SegmentSpec(
            label=BOTH_LUNGS,
            category=ANATOMICAL_STRUCTURE,
            type=Code(value="39607008", scheme="SCT", meaning="Lung"),
        ),
        SegmentSpec(
            label=LOW_ATTENUATION,
            category=MORPHOLOGICALLY_ABNORMAL,
            type=Code(value="87433001", scheme="SCT", meaning="Pulmonary emphysema"),
        ),
    ],
    findings=[VOLUME, MEAN_LUNG_DENSITY, LAA_950, PERC_15, VOLUME_CHANGE, LAA_950_CHANGE],
    queue="cpu",
    series=SeriesSelection(body_parts=["CHEST"], min_slices=10),
    weights=None,
    reference_only=False,
    # with RADNODE_PRIORS_SOURCE set: the newest chest CT of the last two years, for the change since then
    priors=PriorsSpec(within_days=730, max_studies=1),
)
