"""Chest X-ray foundation model: a DINOv2 ViT-L/14 with 4 registers (timm) at 518 px, embeddings + trained heads.

Its manifest is importable without torch or timm; the model lives in `model.py`, the heads file and their
training in `heads.py`, batch embedding of many studies in `embed.py`.

Files in `<models dir>/cxr-foundation/`:

- `backbone.safetensors`: the timm `vit_large_patch14_reg4_dinov2` state dict (no classifier), e.g. the
  `timm/vit_large_patch14_reg4_dinov2.lvd142m` weights or a chest X-ray fine-tune of them;
- `heads.safetensors`: one head per finding, written by `heads.train_heads` / `heads.save_heads`;
- `config.json` (optional): overrides keys of `MANIFEST.config` (e.g. "findings", "thresholds", "backend").

Findings are SNOMED CT disorders (checked against the SNOMED CT International browser and DICOM PS3.16,
where pydicom's concept dictionary holds them: Pleural effusion, Pneumothorax, Pulmonary edema). The
configuration key of each finding (`FINDINGS`) is also its column name in a training labels.csv.
"""

from plugins.base import Code, Manifest, SeriesSelection

FINDINGS: dict[str, Code] = {
    "pneumonia": Code(value="233604007", scheme="SCT", meaning="Pneumonia"),
    "pleural_effusion": Code(value="60046008", scheme="SCT", meaning="Pleural effusion"),
    "pneumothorax": Code(value="36118008", scheme="SCT", meaning="Pneumothorax"),
    "cardiomegaly": Code(value="8186001", scheme="SCT", meaning="Cardiomegaly"),
    "atelectasis": Code(value="46621007", scheme="SCT", meaning="Atelectasis"),
    "lung_nodule": Code(value="786838002", scheme="SCT", meaning="Nodule of lung"),
    "consolidation": Code(value="95436008", scheme="SCT", meaning="Lung consolidation"),
    "pulmonary_edema": Code(value="19242006", scheme="SCT", meaning="Pulmonary edema"),
}

# DINOv2 was pre-trained on RGB images normalised with the ImageNet mean and standard deviation.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

MANIFEST = Manifest(
    name="cxr-foundation",
    version="1.0.0",
    title="Chest X-ray foundation model (DINOv2 ViT-L/14 + registers): findings with heatmaps",
    factory="plugins.cxr_foundation.model:build",
    modalities=["CR", "DX"],
    outputs=["SR", "SC"],
    findings=list(FINDINGS.values()),
    queue="gpu",
    series=SeriesSelection(body_parts=["CHEST"]),
    weights="backbone.safetensors",
    config={
        "model_name": "vit_large_patch14_reg4_dinov2",
        "img_size": 518,
        "patch_size": 14,
        "num_registers": 4,
        "model_kwargs": {},
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "heads_file": "heads.safetensors",
        "findings": list(FINDINGS),
        "thresholds": {},
        "backend": "auto",
    },
)
