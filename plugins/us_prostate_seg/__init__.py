"""Ultrasound prostate segmentation (FPN on a timm ResNet encoder): the prostate mask on every frame, its area.

The manifest is importable without torch or timm; preprocessing lives in `preprocess.py` (numpy/scipy),
the network and the plugin in `model.py`. Codes: SNOMED CT for the segment (CID 7150 "Anatomical
Structure", CID 7151-style "Prostate") and SCT 42798000 "Area" for the per-frame and maximal areas.
`config` is the real architecture and preprocessing; `<models dir>/us-prostate-seg/config.json` may
replace any key (tests shrink the network that way).
"""

from plugins.base import Code, Manifest, SegmentSpec

ANATOMICAL_STRUCTURE = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
PROSTATE_CODE = Code(value="41216001", scheme="SCT", meaning="Prostate")
AREA = Code(value="42798000", scheme="SCT", meaning="Area")

PROSTATE = "prostate"
HEATMAP = "prostate probability"

MANIFEST = Manifest(
    name="us-prostate-seg",
    version="1.0.0",
    title="Ultrasound prostate segmentation (FPN): prostate mask per frame and its area",
    factory="plugins.us_prostate_seg.model:build",
    modalities=["US"],
    outputs=["SEG", "SR", "SC"],
    segments=[SegmentSpec(label=PROSTATE, category=ANATOMICAL_STRUCTURE, type=PROSTATE_CODE)],
    findings=[AREA],
    queue="gpu",
    weights="model.safetensors",
    reference_only=False,
    config={
        "encoder": "resnet34",  # timm model name, features_only=True, pretrained=False (weights come from the file)
        "fpn_channels": 128,
        "size": 768,  # the network's square input (a multiple of 32); frames are letterboxed into it
        "diffusion": {"iterations": 10, "kappa": 30.0, "gamma": 0.15, "option": 1},  # Perona-Malik, grey 0..255
        "threshold": 0.5,
        "mean": 0.449,  # grey normalisation on [0, 1] intensities (ImageNet means averaged over RGB)
        "std": 0.226,
        "backend": "auto",  # ONNX Runtime on a CPU once parity passed; "torch"; "onnx": model.onnx (export-onnx)
        "batch_size": 8,  # frames per forward pass (bounds memory on long cines)
    },
)
