"""us-prostate-seg model: an FPN on a timm ResNet encoder, run on every ultrasound frame; masks and areas.

Network (`FPN`): the encoder's stages at 1/4, 1/8, 1/16 and 1/32 (timm, features_only, one grey input
channel, pretrained=False: the weights file holds every tensor) -> lateral 1x1 convolutions to
`fpn_channels` -> top-down pathway (nearest x2 upsampling + add) -> 3x3 smoothing per level -> the levels
upsampled (bilinear) to 1/4 and summed -> segmentation head (3x3 conv, BN, ReLU, 1x1 conv to one logit)
-> bilinear x4 to the input size -> sigmoid. Input (n, 1, size, size) normalised grey, output (n, size,
size) prostate probability; `size` must be a multiple of 32.

Run: frames in batches of `batch_size`, each cropped, letterboxed, diffused and normalised
(`preprocess.py`); the probability is mapped back onto the frame (inverse letterbox, outside the crop 0),
thresholded, and the largest region kept with its holes filled (one gland per frame). Areas come from the
Image's pixel spacing, which for ultrasound is the calibration of SequenceOfUltrasoundRegions; without one
(the loader's "pixel spacing unknown") areas are not reported, since a pixel count is no UCUM unit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from plugins.base import ONNX_FILE, Findings, Heatmap, Image, Manifest, Measurement, Segmentation, WeightsUnavailable
from plugins.torch_common import OnnxModel, TorchConfig, TorchPlugin, autocast, export_onnx
from plugins.us_prostate_seg import AREA, HEATMAP, PROSTATE
from plugins.us_prostate_seg.preprocess import (
    Letterbox,
    ScanArea,
    anisotropic_diffusion,
    largest_region,
    normalise,
    scan_area,
    to_grey,
)

NO_SPACING = "pixel spacing unknown"  # node.imaging's warning when a US image carries no calibration
NO_CALIBRATION = "no physical calibration: areas not reported"
STAGES = (1, 2, 3, 4)  # timm feature indices of a ResNet: strides 4, 8, 16, 32
STRIDES = [4, 8, 16, 32]
ONNX_CHECK_BATCH = 2


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiffusionConfig(_Config):
    """Perona-Malik parameters (see preprocess.anisotropic_diffusion)."""

    iterations: int = Field(ge=0, le=200)
    kappa: float = Field(gt=0)
    gamma: float = Field(gt=0, le=0.25)
    option: Literal[1, 2]


class ModelConfig(TorchConfig):
    """The plugin's `config` (manifest, overridden by config.json), validated."""

    encoder: str = Field(min_length=1)
    fpn_channels: int = Field(ge=1, le=1024)
    size: int = Field(ge=32, le=4096, multiple_of=32)
    diffusion: DiffusionConfig
    threshold: float = Field(gt=0, lt=1)
    mean: float
    std: float = Field(gt=0)
    batch_size: int = Field(ge=1, le=1024)


class FPN(nn.Module):
    """Feature Pyramid Network for one-class segmentation: (n, 1, s, s) -> (n, s, s) probability."""

    def __init__(self, encoder: str, channels: int) -> None:
        super().__init__()
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False, in_chans=1,
                                         out_indices=STAGES)
        if list(self.encoder.feature_info.reduction()) != STRIDES:
            raise ValueError(f"encoder {encoder} has strides {self.encoder.feature_info.reduction()}, "
                             f"the FPN needs {STRIDES}")
        widths = self.encoder.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, kernel_size=1) for w in widths)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=3, padding=1) for _ in widths)
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        top = laterals[-1]
        pyramid = [top]
        for lateral in reversed(laterals[:-1]):
            top = lateral + F.interpolate(top, scale_factor=2.0, mode="nearest")
            pyramid.insert(0, top)
        merged = None
        for level, (conv, p) in enumerate(zip(self.smooth, pyramid, strict=True)):
            p = conv(p)
            if level:
                p = F.interpolate(p, scale_factor=float(2**level), mode="bilinear", align_corners=False)
            merged = p if merged is None else merged + p
        logits = F.interpolate(self.head(merged), scale_factor=4.0, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0]


def network(config: ModelConfig | dict[str, Any]) -> FPN:
    """The FPN of a configuration (random initial weights: load a weights file into it). Raises ValueError
    for a config that does not validate, or an encoder timm does not know or that lacks the four strides."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.model_validate(config)
    try:
        return FPN(cfg.encoder, cfg.fpn_channels)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(str(exc)) from exc


class ProstateSegmenter(TorchPlugin[ModelConfig]):
    """The prostate on every ultrasound frame: mask, per-frame area, largest area, probability heatmap.
    `load` (TorchPlugin): the FPN from the weights (backend "torch") or model.onnx (backend "onnx")."""

    config_model = ModelConfig
    net: FPN | None = None

    def new_network(self) -> FPN:
        try:
            return network(self.config)
        except ValueError as exc:
            raise WeightsUnavailable(f"{self.manifest.name} config: {exc}") from exc

    def check_onnx(self, onnx: OnnxModel, path: Path) -> None:
        """Raises WeightsUnavailable when model.onnx takes another input size than the configuration's."""
        shape = onnx.session.get_inputs()[0].shape
        if list(shape[1:]) != [1, self.config.size, self.config.size]:
            raise WeightsUnavailable(f"{ONNX_FILE} takes input {shape}, the config says size {self.config.size}: "
                                     "export it again")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, size, size) normalised float32 -> (n, size, size) float32 probability. Raises RuntimeError
        when the plugin is not loaded."""
        if self.onnx is not None:
            return np.asarray(self.onnx(batch)[0], dtype=np.float32)
        if self.net is None:
            raise RuntimeError(f"{self.manifest.name} is not loaded")
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with autocast(self.device):
            return self.net(x).float().cpu().numpy()

    def run(self, image: Image) -> Findings:
        """Masks, areas and the heatmap of US frames (or a single still); not applicable to other images.
        Raises RuntimeError when the plugin is not loaded."""
        if not self.loaded:
            raise RuntimeError(f"{self.manifest.name} is not loaded")
        if image.kind not in ("frames", "image2d"):
            return Findings.not_applicable_because(f"needs ultrasound frames, got a {image.kind}")
        cfg = self.config
        # image2d (a single still): float32 (y, x) in [0, 1]; frames: uint8 (n, y, x[, 3])
        frames = image.pixels if image.kind == "frames" else np.clip(image.pixels * 255.0, 0, 255)[np.newaxis]
        n, rows, cols = frames.shape[:3]
        scan = scan_area(frames, image.attrs)
        ys, xs = scan.box.slices
        letterbox = Letterbox(scan.box.height, scan.box.width, cfg.size)
        mask = np.zeros((n, rows, cols), dtype=bool)
        best, best_pixels, best_probability = -1, 0, None
        for start in range(0, n, cfg.batch_size):
            grey = to_grey(frames[start : start + cfg.batch_size, ys, xs])
            diffused = anisotropic_diffusion(letterbox.to_model(grey), **cfg.diffusion.model_dump())
            probability = letterbox.to_frame(self.predict(normalise(diffused, cfg.mean, cfg.std)[:, np.newaxis]))
            for offset, p in enumerate(probability):
                region = largest_region(p >= cfg.threshold)
                mask[start + offset, ys, xs] = region
                pixels = int(np.count_nonzero(region))
                if pixels > best_pixels:
                    best, best_pixels, best_probability = start + offset, pixels, p
        return self._findings(image, scan, mask, best, best_probability)

    def _findings(self, image: Image, scan: ScanArea, mask: np.ndarray, best: int,
                  best_probability: np.ndarray | None) -> Findings:
        n = mask.shape[0]
        warnings = list(scan.warnings)
        if NO_SPACING in image.warnings:
            warnings.append(NO_CALIBRATION)
        calibrated = bool(image.attrs.get("calibrated", NO_SPACING not in image.warnings)) and scan.spacing_trusted
        if best < 0:
            return Findings(warnings=warnings, summary=f"no prostate found on {n} frame(s)")
        pixels = mask.reshape(n, -1).sum(axis=1)
        frames = [int(k) for k in np.flatnonzero(pixels)]
        summary = f"prostate on {len(frames)} of {n} frame(s); largest on " + (f"frame {best + 1}" if n > 1 else
                                                                                 "the image")
        measurements: list[Measurement] = []
        if calibrated:
            pixel_mm2 = float(image.spacing[-2]) * float(image.spacing[-1])
            areas = {k: round(float(pixels[k]) * pixel_mm2, 1) for k in frames}
            if n > 1:  # one frame: its area is the largest area
                measurements += [Measurement(AREA, areas[k], "mm2", PROSTATE, frame=k) for k in frames]
            measurements.append(Measurement(AREA, areas[best], "mm2", PROSTATE))
            summary += f" ({areas[best]:.0f} mm2)"
        heat = np.zeros(mask.shape, dtype=np.float32)
        heat[best, scan.box.slices[0], scan.box.slices[1]] = np.clip(best_probability, 0.0, 1.0)
        if image.kind == "image2d":
            mask, heat = mask[0], heat[0]
        return Findings(
            segmentations=[Segmentation(PROSTATE, mask)],
            measurements=measurements,
            heatmaps=[Heatmap(HEATMAP, heat, quantity="probability of prostate")],
            warnings=warnings,
            summary=summary,
        )

    def export_onnx(self, path: Path) -> dict[str, Any]:
        """Export the loaded torch network to ONNX at `path` (input "image" (n, 1, size, size), output
        "probability" (n, size, size), dynamic batch) and compare ONNX Runtime with torch on a seeded
        sample batch. Raises RuntimeError when the torch backend is not loaded."""
        if self.net is None:
            raise RuntimeError(f"{self.manifest.name}: export needs the torch backend loaded")
        size = self.config.size
        net = copy.deepcopy(self.net).float().cpu().eval()
        sample = np.random.default_rng(0).normal(0.0, 1.0, (ONNX_CHECK_BATCH, 1, size, size)).astype(np.float32)
        example = torch.from_numpy(sample)
        export_onnx(net, [example], path, ["image"], ["probability"],
                    {"image": {0: "batch"}, "probability": {0: "batch"}})
        with torch.inference_mode():
            expected = net(example).numpy()
        got = OnnxModel(path, torch.device("cpu"))(sample)[0]
        return {"max_abs_diff": float(np.max(np.abs(expected - got))), "path": str(path),
                "input": [ONNX_CHECK_BATCH, 1, size, size]}


def build(manifest: Manifest) -> ProstateSegmenter:
    return ProstateSegmenter(manifest)
