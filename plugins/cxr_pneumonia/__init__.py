"""Chest X-ray pneumonia classifier (NORMAL vs PNEUMONIA), a timm ViT-B/16 with an attention-rollout heatmap.

Its manifest is importable without torch or timm; the model lives in `model.py`. `config` holds the real
architecture and preprocessing; `<models dir>/cxr-pneumonia/config.json` overrides any key of it:

- `model_name`, `img_size`, `model_kwargs`: `timm.create_model(model_name, pretrained=False,
  num_classes=len(classes), img_size=img_size, **model_kwargs)` (never downloads anything);
- `mean`, `std`: per-channel normalisation of the grey image copied into 3 channels. The default is the
  ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) of torchvision-style training
  pipelines. timm's own pretrained `vit_base_patch16_224` tags (augreg) use 0.5 / 0.5 instead: weights
  fine-tuned with timm's `resolve_data_config` need `"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]` in
  config.json — always state the values the weights were trained with;
- `threshold`: the PNEUMONIA probability at or above which the finding is positive;
- `classes`: the classifier's outputs in order, two names, one of them PNEUMONIA (the other is the
  negative class named in the summary);
- `backend`: "auto" (default: ONNX Runtime on a CPU once an export of these weights matched torch, else torch),
  "torch" (the safetensors weights) or "onnx" (`<models dir>/cxr-pneumonia/model.onnx`).
"""

from plugins.base import Code, Manifest, SeriesSelection

PNEUMONIA = Code(value="233604007", scheme="SCT", meaning="Pneumonia")
HEATMAP = "pneumonia-attention"

MANIFEST = Manifest(
    name="cxr-pneumonia",
    version="1.0.0",
    title="Chest X-ray pneumonia classifier (ViT-B/16): NORMAL vs PNEUMONIA, attention heatmap",
    factory="plugins.cxr_pneumonia.model:build",
    modalities=["CR", "DX"],
    outputs=["SR", "SC"],
    findings=[PNEUMONIA],
    triage=[PNEUMONIA],
    queue="gpu",
    series=SeriesSelection(body_parts=["CHEST"]),
    weights="model.safetensors",
    config={
        "model_name": "vit_base_patch16_224",
        "img_size": 224,
        "model_kwargs": {},
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "threshold": 0.5,
        "classes": ["NORMAL", "PNEUMONIA"],
        "backend": "auto",
    },
)
