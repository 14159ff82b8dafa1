"""Chest-CT triage model: body-part and slice checks, preprocessing, a 3-D ResNet with two heads, Grad-CAM.

Pipeline for one CT volume:

1. applicability: an axial CT volume of at least `MANIFEST.series.min_slices` slices whose pixels show
   air-filled lungs inside the body (the router's check: per slice the largest region above -500 HU with its
   holes filled is the body, air below -400 HU inside it in pockets of at least 1 ml counts, 300 ml or more
   is a chest); otherwise not applicable "no lungs: not a chest CT";
2. the missing-slice share comes from the loader's warning "missing slices: N of M expected positions",
   reported as a measurement in percent (0 when the series has no gap);
3. preprocessing: the volume is put in LPS order (axis 0 feet->head, 1 front->back, 2 right->left) following
   the image direction, cropped in-plane to a square (in mm) around the body with a 5 mm margin (air
   outside the image), HU windowed to [0, 1] (`hu_window`, clipped), and resized to `input_size`: axes more
   than twice the target are first area-averaged to twice the target (anti-aliasing), then trilinear;
4. network: a MONAI ResNet (basic blocks, 1 channel, 7^3 stem with stride 2, max-pooling) whose last stage
   (layer4) is average-pooled into two linear heads: 1 pathology logit and 20 finding logits (sigmoid each);
5. heatmap: Grad-CAM of the pathology logit on layer4. The head is a linear map of the average-pooled
   features, so the gradient of the logit with respect to every layer4 voxel is the head weight / N and
   Grad-CAM equals ReLU(sum_c w_c A_c) up to a constant; the network computes it in its forward pass
   (no backward pass; the ONNX model has it too). Normalised by its maximum, resized to the crop box and
   placed back in the image's own orientation: values in [0, 1], zero outside the crop.

Backends: "torch" (safetensors weights, strict loading, bf16 autocast on CUDA) and "onnx" (model.onnx beside
the weights, written by `export_onnx`). Weights are never made up: a missing or mismatched file makes the
plugin unavailable (WeightsUnavailable).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from scipy.special import expit
from torch import nn
from torch.nn import functional as F

from plugins import torch_common
from plugins.base import (
    Classification,
    Findings,
    Heatmap,
    Image,
    Manifest,
    Measurement,
    NotApplicable,
    WeightsUnavailable,
)
from plugins.ct_chest_triage import FINDING_KEYS, FINDINGS, MISSING_SLICES, PATHOLOGY, PATHOLOGY_KEY
from plugins.lungs import LUNG_MIN_ML, internal_air
from plugins.torch_common import HuWindow, OnnxModel, TorchConfig, TorchPlugin, autocast, validated_config

# Body-part check, as the router's (node.route.lungs.check_lungs): plugins do not import node.
MAX_AXIAL_TILT_COS = 0.7  # |slice normal . z| below this: not an axial series
CROP_MARGIN_MM = 5.0
AIR_VALUE_HU = -1000.0  # fill outside the image
MISSING_RE = re.compile(r"missing slices: (\d+) of (\d+) expected positions")
ENCODER_BLOCKS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
INPUT_NAME = "volume"
OUTPUT_NAMES = ("pathology", "findings", "cam")
HEATMAP_NAME = "pathology (Grad-CAM)"

Positive = Annotated[int, Field(ge=1)]
Side = Annotated[int, Field(ge=8)]


class TriageConfig(TorchConfig):
    """The plugin's configuration (manifest `config`, overridden by config.json), validated."""

    encoder: Literal["resnet10", "resnet18", "resnet34"]
    widths: tuple[Positive, Positive, Positive, Positive]
    input_size: tuple[Side, Side, Side]
    hu_window: HuWindow
    thresholds: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]]

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        known = (PATHOLOGY_KEY, *FINDING_KEYS)
        unknown = sorted(set(v) - set(known))
        if unknown:
            raise ValueError(f"unknown finding(s) {', '.join(unknown)} (known: {', '.join(known)})")
        missing = [k for k in known if k not in v]
        if missing:
            raise ValueError(f"no threshold for {', '.join(missing)}")
        return v


def parse_config(config: dict[str, Any]) -> TriageConfig:
    """Validate the merged configuration. Raises WeightsUnavailable naming the bad keys."""
    return validated_config(TriageConfig, config, "ct-chest-triage")


# --- the network -----------------------------------------------------------------------------------


class TriageNet(nn.Module):
    """MONAI 3-D ResNet encoder; pathology and finding heads on the average-pooled last stage.

    forward(x (B, 1, Z, Y, X) in [0, 1]) -> (pathology logit (B,), finding logits (B, 20), Grad-CAM of the
    pathology logit on the last stage (B, z, y, x), not normalised)."""

    def __init__(self, encoder: str, widths: Sequence[int], n_findings: int = len(FINDING_KEYS)) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.encoder = ResNet(block="basic", layers=ENCODER_BLOCKS[encoder], block_inplanes=list(widths),
                              spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2,
                              feed_forward=False)
        self.pathology_head = nn.Linear(widths[3], 1)
        self.findings_head = nn.Linear(widths[3], n_findings)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last encoder stage (layer4), before pooling: MONAI ResNet.forward up to its avgpool."""
        e = self.encoder
        x = e.act(e.bn1(e.conv1(x)))
        if not e.no_max_pool:
            x = e.maxpool(x)
        return e.layer4(e.layer3(e.layer2(e.layer1(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.feature_map(x)
        pooled = features.mean(dim=(2, 3, 4))
        pathology = self.pathology_head(pooled)[:, 0]
        findings = self.findings_head(pooled)
        # Grad-CAM: d logit / d A_c = w_c / N everywhere, so the channel weights are the head's weights
        weights = self.pathology_head.weight[0].view(1, -1, 1, 1, 1)
        cam = torch.relu((features * weights).sum(dim=1))
        return pathology, findings, cam


def build_network(config: TriageConfig) -> TriageNet:
    """The architecture the configuration names, with fresh (untrained) parameters."""
    return TriageNet(config.encoder, config.widths)


# --- geometry and preprocessing --------------------------------------------------------------------


@dataclass(frozen=True)
class Orientation:
    """How to reach LPS order (axis 0 = patient z, 1 = y, 2 = x) from the image's array: flip the array axes
    in `flips`, then transpose by `perm` (canonical axis k = array axis perm[k])."""

    flips: tuple[bool, bool, bool]
    perm: tuple[int, int, int]

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        flipped = np.flip(a, axis=[i for i, f in enumerate(self.flips) if f]) if any(self.flips) else a
        return np.transpose(flipped, self.perm)

    def from_canonical(self, a: np.ndarray) -> np.ndarray:
        back = np.transpose(a, np.argsort(self.perm))
        return np.flip(back, axis=[i for i, f in enumerate(self.flips) if f]) if any(self.flips) else back

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(spacing[k]) for k in self.perm)  # type: ignore[return-value]


def orientation(image: Image) -> Orientation:
    """The axis flips and order that put the volume in LPS order. Raises NotApplicable for a series that is
    not axial (the slice normal far from the patient's z axis)."""
    d = np.asarray(image.direction if image.direction is not None else np.eye(3), dtype=np.float64)
    vectors = (d[2], d[1], d[0])  # patient-space direction of increasing array index along axes 0, 1, 2
    if abs(vectors[0][2]) < MAX_AXIAL_TILT_COS:
        raise NotApplicable("not an axial series: chest CT triage needs axial slices")
    axes = [int(np.argmax(np.abs(v))) for v in vectors]  # 0 = x, 1 = y, 2 = z
    if sorted(axes) != [0, 1, 2]:
        raise NotApplicable("the image direction cosines do not name three distinct patient axes")
    flips = tuple(bool(vectors[a][axes[a]] < 0) for a in range(3))
    perm = (axes.index(2), axes.index(1), axes.index(0))
    return Orientation(flips, perm)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BodyCheck:
    """Internal air volume (the lungs of a chest CT) and the in-plane bounding box of the body."""

    air_ml: float
    rows: tuple[int, int]  # [start, stop) in canonical rows (y)
    cols: tuple[int, int]  # [start, stop) in canonical columns (x)


def body_check(hu: np.ndarray, spacing: Sequence[float]) -> BodyCheck:
    """Body and internal air of a (z, y, x) HU volume, on a grid coarsened 2x in-plane when the slices are
    256 pixels or more. Raises NotApplicable when no slice shows a body."""
    dz, dy, dx = (float(s) for s in spacing)
    factor = 2 if hu.shape[1] >= 256 and hu.shape[2] >= 256 else 1
    if factor > 1:
        rows, cols = hu.shape[1] // 2 * 2, hu.shape[2] // 2 * 2
        hu = hu[:, :rows, :cols].reshape(len(hu), rows // 2, 2, cols // 2, 2).mean(axis=(2, 4))
    found = internal_air(hu, dz * dy * dx * factor * factor / 1000.0)
    if found.body is None:
        raise NotApplicable("no body found in the image")
    union, air_ml = found.body, found.volume_ml
    rows_any, cols_any = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    return BodyCheck(round(air_ml, 1), (int(rows_any[0]) * factor, (int(rows_any[-1]) + 1) * factor),
                     (int(cols_any[0]) * factor, (int(cols_any[-1]) + 1) * factor))


def missing_slices_percent(warnings: Sequence[str]) -> float:
    """Share (%) of the expected slice positions missing, from the loader's "missing slices: N of M expected
    positions" warning; 0 when there is none."""
    for warning in warnings:
        match = MISSING_RE.search(warning)
        if match and int(match.group(2)) > 0:
            return round(100.0 * int(match.group(1)) / int(match.group(2)), 2)
    return 0.0


def window(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """HU mapped linearly from [low, high] to [0, 1], clipped outside (float32)."""
    low, high = float(hu_window[0]), float(hu_window[1])
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def resize(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize (B, C, Z, Y, X) to `size`: axes more than twice the target are area-averaged to twice the target
    first (anti-aliasing), then trilinear interpolation (half-pixel centres)."""
    shape = volume.shape[2:]
    middle = [min(n, 2 * t) for n, t in zip(shape, size, strict=True)]
    if list(middle) != list(shape):
        volume = F.adaptive_avg_pool3d(volume, middle)
    return F.interpolate(volume, size=tuple(size), mode="trilinear", align_corners=False)


@dataclass(frozen=True)
class Prepared:
    """The model input and what is needed to map the heatmap back onto the image."""

    volume: torch.Tensor  # (1, 1, *input_size) float32 in [0, 1]
    orientation: Orientation
    canonical_shape: tuple[int, int, int]
    box: tuple[int, int, int, int]  # canonical rows [r0, r1) and columns [c0, c1), may reach outside the image
    lung_ml: float


def crop_box(check: BodyCheck, spacing: Sequence[float]) -> tuple[int, int, int, int]:
    """A square (in mm) around the body's bounding box plus CROP_MARGIN_MM, centred on it."""
    _, dy, dx = (float(s) for s in spacing)
    height_mm = (check.rows[1] - check.rows[0]) * dy
    width_mm = (check.cols[1] - check.cols[0]) * dx
    side_mm = max(height_mm, width_mm) + 2.0 * CROP_MARGIN_MM
    rows, cols = max(1, int(round(side_mm / dy))), max(1, int(round(side_mm / dx)))
    centre_r, centre_c = (check.rows[0] + check.rows[1]) / 2.0, (check.cols[0] + check.cols[1]) / 2.0
    r0, c0 = int(round(centre_r - rows / 2.0)), int(round(centre_c - cols / 2.0))
    return r0, r0 + rows, c0, c0 + cols


def _paste(target: np.ndarray, source: np.ndarray, r0: int, c0: int) -> None:
    """Copy `source` into `target` at rows r0.., columns c0.. (either may lie partly outside the other)."""
    rows, cols = target.shape[1:]
    tr = slice(max(0, r0), min(rows, r0 + source.shape[1]))
    tc = slice(max(0, c0), min(cols, c0 + source.shape[2]))
    if tr.start < tr.stop and tc.start < tc.stop:
        target[:, tr, tc] = source[:, tr.start - r0 : tr.stop - r0, tc.start - c0 : tc.stop - c0]


def prepare(image: Image, config: TriageConfig, device: torch.device | None = None) -> Prepared:
    """Steps 1 and 3 of the module docstring: the model input of an axial CT volume, on `device` (CPU by
    default). Raises NotApplicable (not axial; no body)."""
    orient = orientation(image)
    hu = orient.to_canonical(image.pixels)
    spacing = orient.spacing(image.spacing)
    check = body_check(hu, spacing)
    r0, r1, c0, c1 = crop_box(check, spacing)
    crop = np.full((hu.shape[0], r1 - r0, c1 - c0), AIR_VALUE_HU, dtype=np.float32)
    _paste(crop, hu, -r0, -c0)  # rows and columns of the square outside the image stay air
    windowed = torch.from_numpy(window(crop, config.hu_window)).to(device or torch.device("cpu"))
    volume = resize(windowed[None, None], config.input_size).clamp_(0.0, 1.0)
    return Prepared(volume, orient, tuple(hu.shape), (r0, r1, c0, c1), check.air_ml)  # type: ignore[arg-type]


def heatmap_on_image(cam: np.ndarray, prepared: Prepared) -> np.ndarray:
    """The Grad-CAM map (z, y, x at the last stage's resolution) normalised to [0, 1] by its maximum, resized
    to the crop box and placed back in the image's array order (zero outside the crop)."""
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32))
    peak = float(cam.max()) if cam.size else 0.0
    depth = prepared.canonical_shape[0]
    r0, r1, c0, c1 = prepared.box
    canonical = np.zeros(prepared.canonical_shape, dtype=np.float32)
    if peak > 0.0:
        scaled = torch.from_numpy(cam / peak)[None, None]
        resized = F.interpolate(scaled, size=(depth, r1 - r0, c1 - c0), mode="trilinear", align_corners=False)
        _paste(canonical, resized[0, 0].clamp_(0.0, 1.0).numpy(), r0, c0)
    return np.ascontiguousarray(prepared.orientation.from_canonical(canonical))


# --- the plugin ------------------------------------------------------------------------------------


class ChestTriage(TorchPlugin[TriageConfig]):
    """Normal vs pathology and 20 findings on a chest CT, with a Grad-CAM heatmap of the pathology logit.
    `load` (TorchPlugin): the TriageNet from the weights (backend "torch") or model.onnx (backend "onnx")."""

    config_model = TriageConfig
    net: TriageNet | None = None

    def new_network(self) -> TriageNet:
        return build_network(self.config)

    def check_onnx(self, onnx: OnnxModel, path: Path) -> None:
        """Raises WeightsUnavailable when model.onnx was exported for another input size or other outputs."""
        inputs, outputs = onnx.session.get_inputs(), onnx.session.get_outputs()
        shape = list(inputs[0].shape[2:]) if len(inputs) == 1 else []
        if shape != list(self.config.input_size) or len(outputs) != len(OUTPUT_NAMES):
            found = inputs[0].shape if inputs else None
            size = ", ".join(map(str, self.config.input_size))
            raise WeightsUnavailable(f"{path.name} does not fit the configuration: input {found}, {len(outputs)} "
                                     f"outputs; expected (batch, 1, {size}) and {len(OUTPUT_NAMES)} outputs (re-run "
                                     "export-onnx)")

    def run(self, image: Image) -> Findings:
        if not self.loaded:
            raise RuntimeError("ct-chest-triage: run() before load()")
        try:
            prepared = self._applicable(image)
        except NotApplicable as exc:
            return Findings.not_applicable_because(str(exc))
        pathology_logit, finding_logits, cam = self._infer(prepared.volume)
        thresholds = self.config.thresholds
        pathology = Classification(PATHOLOGY, _probability(pathology_logit), thresholds[PATHOLOGY_KEY])
        findings = [
            Classification(FINDINGS[key], _probability(logit), thresholds[key])
            for key, logit in zip(FINDING_KEYS, finding_logits, strict=True)
        ]
        missing = missing_slices_percent(image.warnings)
        warnings = [f"body part verified: chest (lungs {prepared.lung_ml:.0f} ml)"]
        if missing > 0:
            warnings.append(f"{missing:g}% of the slice positions are missing: the model saw the remaining slices "
                            "stacked without the gaps")
        positive = [c.concept.meaning for c in findings if c.positive]
        verdict = "abnormal" if pathology.positive else "no pathology detected"
        summary = (f"Chest CT triage: {verdict} (p={pathology.probability:.2f}, threshold {pathology.threshold:g}); "
                   f"findings above threshold: {', '.join(positive) if positive else 'none'}")
        return Findings(
            classifications=[pathology, *findings],
            measurements=[Measurement(MISSING_SLICES, missing, "%")],
            heatmaps=[Heatmap(HEATMAP_NAME, heatmap_on_image(cam, prepared),
                              quantity="Grad-CAM relevance for pathology")],
            warnings=warnings,
            summary=summary,
        )

    def _applicable(self, image: Image) -> Prepared:
        """The model input, or NotApplicable saying why the series does not suit the model."""
        if image.kind != "volume":
            raise NotApplicable(f"not a volume ({image.kind}): chest CT triage needs an axial CT volume")
        if image.modality != "CT":
            raise NotApplicable(f"modality {image.modality}: chest CT triage needs CT")
        minimum = self.manifest.series.min_slices
        if image.pixels.shape[0] < minimum:
            raise NotApplicable(f"too few slices: {image.pixels.shape[0]} (minimum {minimum})")
        device = self.device if self.net is not None else torch.device("cpu")
        prepared = prepare(image, self.config, device)
        if prepared.lung_ml < LUNG_MIN_ML:
            raise NotApplicable(f"no lungs: not a chest CT ({prepared.lung_ml:.0f} ml of air inside the body, "
                                f"{LUNG_MIN_ML:.0f} ml needed)")
        return prepared

    def _infer(self, volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pathology logit, 20 finding logits, Grad-CAM map) of one preprocessed volume."""
        if self.onnx is not None:
            pathology, findings, cam = self.onnx(volume.cpu().numpy())
            return pathology[0], findings[0], cam[0]
        assert self.net is not None
        with autocast(self.device):
            outputs = self.net(volume)
        pathology, findings, cam = (t.float().cpu().numpy() for t in outputs)
        return pathology[0], findings[0], cam[0]

    def export_onnx(self, path: Path) -> dict[str, Any]:
        """Export the loaded torch model (float32, CPU copy) to ONNX at `path`, run both on one random input
        of the configured size and return {"max_abs_diff", "outputs" (per output), "path"}. Raises
        RuntimeError when the plugin is not loaded with backend "torch", or from the exporter."""
        if self.net is None:
            raise RuntimeError("ct-chest-triage: load the plugin with backend \"torch\" before exporting to ONNX")
        net = copy.deepcopy(self.net).float().cpu().eval()
        sample = torch.rand((1, 1, *self.config.input_size), generator=torch.Generator().manual_seed(0))
        dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
        torch_common.export_onnx(net, [sample], path, [INPUT_NAME], OUTPUT_NAMES, dynamic)
        with torch.inference_mode():
            expected = [t.numpy() for t in net(sample)]
        got = OnnxModel(path, torch.device("cpu"))(sample.numpy())
        diffs = {name: float(np.max(np.abs(e - g))) for name, e, g in zip(OUTPUT_NAMES, expected, got, strict=True)}
        return {"max_abs_diff": max(diffs.values()), "outputs": diffs, "path": str(path)}


def _probability(logit: np.ndarray | float) -> float:
    return float(np.clip(expit(np.float64(logit)), 0.0, 1.0))


def build(manifest: Manifest) -> ChestTriage:
    """The plugin (not loaded yet): the manifest's factory."""
    return ChestTriage(manifest)
