"""CT abdominal multi-organ segmentation (MONAI SwinUNETR, the 13 organs of the BTCV challenge) with organ volumes.

Its manifest is importable without torch or MONAI; the model lives in `model.py`. Segments are coded as
SEG and SR expect: category SCT 91723000 "Anatomical Structure" (CID 7150) and a SNOMED CT body-structure
type per organ. DICOM codes a lateral organ as the organ plus a laterality modifier; `SegmentSpec` has no
modifier, so the kidneys and adrenal glands use SNOMED CT's pre-coordinated left/right structure concepts.
BTCV's "portal vein and splenic vein" is one label, coded with the combined concept SCT 110765007 (as in
TotalSegmentator's published SNOMED CT mapping). Volumes use SCT 118565006 "Volume" in mL.

`config` is the architecture and preprocessing of the weights (MONAI's BTCV recipe);
`<models dir>/ct-organ-seg/config.json` may override any key:

- `feature_size`: SwinUNETR width (a multiple of 12); `labels`: the organ of each output channel 1..N
  (channel 0 is background), each one a segment of this manifest;
- `orientation`: the axis codes of the network input (MONAI `Orientation`, "RAS": axis 0 runs to the
  patient's right, 1 to anterior, 2 to superior), reached by transposing and flipping the image array;
- `spacing`: the voxel size the network expects, in mm, in the image's (z, y, x) order: head-foot,
  front-back, right-left, i.e. MONAI's pixdim (1.5, 1.5, 2.0) given in (x, y, z);
- `hu_window`: HU mapped linearly to [0, 1] and clipped (MONAI `ScaleIntensityRange`);
- `roi_size` (in network axes), `overlap`, `mode`, `sw_batch_size`: MONAI sliding-window inference;
  SwinUNETR needs multiples of 32, at least 64 (its bottleneck at 1/32 resolution is instance-normalised);
- `backend`: "auto" (default: ONNX Runtime on a CPU once an export of these weights matched torch, else torch),
  "torch" (the safetensors weights) or "onnx" (`model.onnx` written by `radnode export-onnx`).
"""

from plugins.base import Code, Manifest, SegmentSpec, SeriesSelection

ANATOMICAL_STRUCTURE = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
VOLUME = Code(value="118565006", scheme="SCT", meaning="Volume")

SPLEEN = "spleen"
RIGHT_KIDNEY = "right kidney"
LEFT_KIDNEY = "left kidney"
GALLBLADDER = "gallbladder"
ESOPHAGUS = "esophagus"
LIVER = "liver"
STOMACH = "stomach"
AORTA = "aorta"
INFERIOR_VENA_CAVA = "inferior vena cava"
PORTAL_SPLENIC_VEINS = "portal vein and splenic vein"
PANCREAS = "pancreas"
RIGHT_ADRENAL = "right adrenal gland"
LEFT_ADRENAL = "left adrenal gland"

# BTCV label order (output channels 1..13 of the MONAI BTCV SwinUNETR); SNOMED CT body structures.
ORGANS: tuple[tuple[str, str, str], ...] = (
    (SPLEEN, "78961009", "Spleen"),
    (RIGHT_KIDNEY, "9846003", "Right kidney"),
    (LEFT_KIDNEY, "18639004", "Left kidney"),
    (GALLBLADDER, "28231008", "Gallbladder"),
    (ESOPHAGUS, "32849002", "Esophagus"),
    (LIVER, "10200004", "Liver"),
    (STOMACH, "69695003", "Stomach"),
    (AORTA, "15825003", "Aorta"),
    (INFERIOR_VENA_CAVA, "64131007", "Inferior vena cava"),
    (PORTAL_SPLENIC_VEINS, "110765007", "Portal vein and splenic vein"),
    (PANCREAS, "15776009", "Pancreas"),
    (RIGHT_ADRENAL, "29392005", "Right adrenal gland"),
    (LEFT_ADRENAL, "12003004", "Left adrenal gland"),
)
LABELS = [label for label, _, _ in ORGANS]

MANIFEST = Manifest(
    name="ct-organ-seg",
    version="1.0.0",
    title="CT abdominal organ segmentation (SwinUNETR, 13 BTCV organs) and organ volumes",
    factory="plugins.ct_organ_seg.model:build",
    modalities=["CT"],
    outputs=["SEG", "SR"],
    segments=[
        SegmentSpec(label=label, category=ANATOMICAL_STRUCTURE, type=Code(value=value, scheme="SCT", meaning=meaning))
        for label, value, meaning in ORGANS
    ],
    findings=[VOLUME],
    queue="gpu",
    series=SeriesSelection(body_parts=["ABDOMEN", "WHOLEBODY"], min_slices=10),
    weights="model.safetensors",
    config={
        "feature_size": 48,
        "labels": LABELS,
        "orientation": "RAS",
        "spacing": [2.0, 1.5, 1.5],
        "hu_window": [-175.0, 250.0],
        "roi_size": [96, 96, 96],
        "overlap": 0.25,
        "mode": "gaussian",
        "sw_batch_size": 2,
        "backend": "auto",
    },
)
