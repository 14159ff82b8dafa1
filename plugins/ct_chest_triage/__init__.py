"""Chest-CT triage (normal vs pathology, 20 findings): the manifest and its coded concepts; no torch here.

The model (`model.py`) is a MONAI 3-D ResNet encoder with two heads on the pooled features: one logit
"pathology present" (normal vs abnormal chest CT) and 20 multi-label finding logits, the CT-RATE
abnormality set plus pneumothorax and mass. The first head's concept is SCT 408574004 "Imaging result
abnormal" (DICOM CID 3209): the triage question is whether this chest CT is abnormal, which is an
imaging finding rather than a disease (SCT 64572001 "Disease" would claim a diagnosis).

Codes, one per finding, in the order of the model's finding logits (`FINDING_KEYS`):

- SNOMED CT where a concept states the finding: pulmonary emphysema 87433001, atelectasis 46621007, pulmonary
  nodule 786838002 (FSN "Nodule of lung (disorder)"), fibrosis of lung 51615001 (the fibrotic sequelae),
  pleural effusion 60046008, lung consolidation 95436008, bronchiectasis 12295008, cardiomegaly 8186001,
  pericardial effusion 373945007, calcification of coronary artery 445512009, hiatal hernia 84089009,
  lymphadenopathy 30746006, vascular calcification 129759000 (DICOM CID 6010; SNOMED CT has no concept
  limited to arterial walls that we could verify), medical device 63653004 (the "medical material" of CT-RATE:
  tubes, catheters, stents, implants), pneumothorax 36118008, mass 4147007 (DICOM CID 6102);
- DICOM's thoracic imaging signs (CID 6102 "Thoracic Findings or Features", after Fraser and Pare) where
  SNOMED CT has no verified concept for the CT sign: DCM 112001 "Opacity" (lung opacity), DCM 112130 "Mosaic
  pattern" (mosaic attenuation), DCM 112114 "Septal line(s)" (thickened interlobular septa);
- 99RADNODE PERIBRONCHIAL for peribronchial thickening: neither SNOMED CT nor DICOM has a concept we
  could verify (codes quoted for it elsewhere turned out to mean "Obstruction").

The missing-slice share of the series is reported as 99RADNODE MISSINGSLICES in percent (DICOM defines
no concept for it).
"""

from plugins.base import Code, Manifest, SeriesSelection

PATHOLOGY_KEY = "pathology"
PATHOLOGY = Code(value="408574004", scheme="SCT", meaning="Imaging result abnormal")

# key -> concept, in the order of the model's 20 finding logits (CT-RATE's 18, then pneumothorax and mass)
FINDINGS: dict[str, Code] = {
    "medical_material": Code(value="63653004", scheme="SCT", meaning="Medical device"),
    "arterial_wall_calcification": Code(value="129759000", scheme="SCT", meaning="Vascular calcification"),
    "cardiomegaly": Code(value="8186001", scheme="SCT", meaning="Cardiomegaly"),
    "pericardial_effusion": Code(value="373945007", scheme="SCT", meaning="Pericardial effusion"),
    "coronary_artery_wall_calcification": Code(
        value="445512009", scheme="SCT", meaning="Calcification of coronary artery"
    ),
    "hiatal_hernia": Code(value="84089009", scheme="SCT", meaning="Hiatal hernia"),
    "lymphadenopathy": Code(value="30746006", scheme="SCT", meaning="Lymphadenopathy"),
    "emphysema": Code(value="87433001", scheme="SCT", meaning="Pulmonary emphysema"),
    "atelectasis": Code(value="46621007", scheme="SCT", meaning="Atelectasis"),
    "lung_nodule": Code(value="786838002", scheme="SCT", meaning="Pulmonary nodule"),
    "lung_opacity": Code(value="112001", scheme="DCM", meaning="Opacity"),
    "pulmonary_fibrotic_sequela": Code(value="51615001", scheme="SCT", meaning="Fibrosis of lung"),
    "pleural_effusion": Code(value="60046008", scheme="SCT", meaning="Pleural effusion"),
    "mosaic_attenuation_pattern": Code(value="112130", scheme="DCM", meaning="Mosaic pattern"),
    "peribronchial_thickening": Code(value="PERIBRONCHIAL", scheme="99RADNODE", meaning="Peribronchial thickening"),
    "consolidation": Code(value="95436008", scheme="SCT", meaning="Lung consolidation"),
    "bronchiectasis": Code(value="12295008", scheme="SCT", meaning="Bronchiectasis"),
    "interlobular_septal_thickening": Code(value="112114", scheme="DCM", meaning="Septal line(s)"),
    "pneumothorax": Code(value="36118008", scheme="SCT", meaning="Pneumothorax"),
    "mass": Code(value="4147007", scheme="SCT", meaning="Mass"),
}
FINDING_KEYS = tuple(FINDINGS)

MISSING_SLICES = Code(value="MISSINGSLICES", scheme="99RADNODE", meaning="Missing slice positions")

MANIFEST = Manifest(
    name="ct-chest-triage",
    version="1.0.0",
    title="Chest CT triage: normal vs pathology and 20 findings (3-D ResNet, Grad-CAM heatmap)",
    factory="plugins.ct_chest_triage.model:build",
    modalities=["CT"],
    outputs=["SR", "SC"],
    findings=[PATHOLOGY, *FINDINGS.values(), MISSING_SLICES],
    triage=[PATHOLOGY],
    queue="gpu",
    series=SeriesSelection(body_parts=["CHEST"], min_slices=20),
    weights="model.safetensors",
    config={
        # MONAI ResNet (basic blocks; resnet10/18/34 = 1/2/3-6-4-3 blocks per stage), 1 input channel,
        # 7^3 stem with stride 2 then max-pooling; `widths` = channels of the four stages
        "encoder": "resnet18",
        "widths": [64, 128, 256, 512],
        # model input (z, y, x) in voxels: the volume in LPS order (feet->head, front->back, right->left),
        # cropped in-plane to a square around the body, resized to this size (area-reduced, then trilinear)
        "input_size": [128, 256, 256],
        "hu_window": [-1000.0, 400.0],  # HU mapped linearly to [0, 1], clipped outside
        "thresholds": {PATHOLOGY_KEY: 0.5, **{key: 0.5 for key in FINDINGS}},
        "backend": "auto",  # ONNX Runtime on a CPU once parity passed; "torch"; "onnx": model.onnx (export-onnx)
    },
)
