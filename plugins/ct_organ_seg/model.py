"""CT organ segmentation model: pre-process (orientation, spacing, HU window), SwinUNETR sliding-window
inference (torch or ONNX Runtime), post-process (labels back on the source grid, one mask and one volume per
organ found).

1. The HU volume (z, y, x) is transposed and flipped into the network's axis order (`orientation`, "RAS"),
   then resampled trilinearly to `spacing` over the same extent (the voxel count is rounded, so the spacing
   is met to within half a voxel over the whole length), then windowed to [0, 1];
2. MONAI `sliding_window_inference` with Gaussian blending runs the network on `roi_size` windows, under
   `torch_common.autocast` (mixed precision on CUDA); the label of a voxel is the arg-max of the blended logits;
3. labels go back to the source grid by nearest neighbour (each source voxel takes the label of the network
   voxel whose cell holds its centre) and the inverse flips and transposition: exactly the image's shape;
4. per organ present: its mask and its volume (voxel count x voxel volume of the source grid, mL).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from plugins.base import Findings, Image, Manifest, Measurement, Segmentation, WeightsUnavailable
from plugins.ct_organ_seg import VOLUME
from plugins.torch_common import (
    HuWindow,
    OnnxModel,
    TorchConfig,
    TorchPlugin,
    autocast,
    export_onnx,
    merged_config,
    validated_config,
)

log = logging.getLogger("radnode.plugins.ct-organ-seg")

# Axis code -> (patient axis in DICOM LPS: 0 = x, 1 = y, 2 = z; direction along it). LPS: +x is the
# patient's left, +y posterior, +z superior (head).
AXIS_CODES = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
NETWORK_DIVISOR = 32  # SwinUNETR downsamples 5 times
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class OrganSegConfig(TorchConfig):
    """The architecture and preprocessing in force (the manifest's `config` with config.json applied)."""

    feature_size: int = Field(gt=0, multiple_of=12)
    labels: list[str] = Field(min_length=1, description="organ of output channel 1..N (0 is background)")
    orientation: str = Field(description='axis codes of the network input, e.g. "RAS"')
    spacing: tuple[float, float, float] = Field(description="mm, (z, y, x): head-foot, front-back, right-left")
    hu_window: HuWindow
    roi_size: tuple[int, int, int] = Field(description="window size in network axes (orientation order)")
    overlap: float = Field(ge=0.0, lt=1.0)
    mode: Literal["gaussian", "constant"]
    sw_batch_size: int = Field(ge=1)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        v = v.upper()
        if len(v) != 3 or any(c not in AXIS_CODES for c in v) or len({AXIS_CODES[c][0] for c in v}) != 3:
            raise ValueError(f"orientation must name each patient axis once (e.g. RAS, LPS), got {v!r}")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"spacing must be three positive numbers of mm, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _roi(self) -> OrganSegConfig:
        roi = self.roi_size
        if any(r < 2 * NETWORK_DIVISOR or r % NETWORK_DIVISOR for r in roi):
            raise ValueError(f"roi_size must be multiples of {NETWORK_DIVISOR} and at least {2 * NETWORK_DIVISOR}: "
                             f"SwinUNETR's bottleneck at 1/{NETWORK_DIVISOR} resolution must be wider than one voxel "
                             f"(instance norms; ONNX export), got {list(roi)}")
        return self


def parse_config(manifest: Manifest, config: dict[str, Any]) -> OrganSegConfig:
    """Validate a merged configuration against the architecture's rules and the manifest's segments.

    Raises WeightsUnavailable naming the problem (a bad config.json makes the model unusable)."""
    parsed = validated_config(OrganSegConfig, config, manifest.name)
    declared = {s.label for s in manifest.segments}
    undeclared = [label for label in parsed.labels if label not in declared]
    if undeclared:
        raise WeightsUnavailable(f"{manifest.name} configuration names label(s) the manifest does not declare as "
                                 f"segments: {', '.join(undeclared)}")
    return parsed


def network_for(config: OrganSegConfig | Mapping[str, Any]) -> Any:
    """The SwinUNETR of a configuration (parsed, or a dict such as the manifest's `config`), with random
    weights: load real ones with `load_weights`. Raises pydantic's ValidationError for a bad dict."""
    from monai.networks.nets import SwinUNETR

    cfg = config if isinstance(config, OrganSegConfig) else OrganSegConfig.model_validate(dict(config))
    return SwinUNETR(in_channels=1, out_channels=1 + len(cfg.labels), feature_size=cfg.feature_size)


# --- pre- and post-processing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGrid:
    """How the image array (z, y, x) maps onto the network's grid and back.

    Network axis i is image axis `axes[i]`, reversed when `flips[i]`, resampled from `oriented[i]` to
    `shape[i]` voxels over the same extent."""

    source_shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    oriented: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # of the network grid, network axis order (mm)

    @classmethod
    def of(cls, shape: Sequence[int], spacing: Sequence[float], direction: Sequence[Sequence[float]] | None,
           target_zyx: Sequence[float], orientation: str) -> ModelGrid:
        """The grid of a volume `shape` (z, y, x) with `spacing` (z, y, x) and `direction` (row, column and
        slice-normal cosines in LPS, as in `plugins.base.Image`; None = axial LPS).

        Raises ValueError for a volume whose axes do not each follow a different patient axis."""
        cosines = direction if direction is not None else ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        # image axis 0 (slices) runs along the slice normal, axis 1 (rows) along the column cosines,
        # axis 2 (columns) along the row cosines
        along = [np.asarray(cosines[2], float), np.asarray(cosines[1], float), np.asarray(cosines[0], float)]
        dominant = [int(np.argmax(np.abs(v))) for v in along]
        if len(set(dominant)) != 3:
            raise ValueError("the volume's axes are too oblique to the patient axes to orient it")
        axes, flips, target = [], [], []
        for code in orientation:
            patient_axis, sign = AXIS_CODES[code]
            axis = dominant.index(patient_axis)
            axes.append(axis)
            flips.append(bool(np.sign(along[axis][patient_axis]) != sign))
            target.append(float(target_zyx[2 - patient_axis]))  # target spacing is (z, y, x) = LPS axes 2, 1, 0
        oriented = tuple(int(shape[a]) for a in axes)
        sizes = tuple(max(1, round(n * float(spacing[a]) / t)) for n, a, t in zip(oriented, axes, target, strict=True))
        grid_spacing = tuple(n * float(spacing[a]) / s for n, a, s in zip(oriented, axes, sizes, strict=True))
        return cls(tuple(int(n) for n in shape), tuple(axes), tuple(flips), oriented, sizes, grid_spacing)

    def to_model(self, volume: np.ndarray) -> np.ndarray:
        """The volume on the network grid: transposed, flipped, resampled trilinearly (float32)."""
        import torch
        import torch.nn.functional as F

        oriented = self._orient(volume)
        if oriented.shape == self.shape:
            return np.ascontiguousarray(oriented, dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(oriented, dtype=np.float32))[None, None]
        with torch.inference_mode():
            return F.interpolate(tensor, size=self.shape, mode="trilinear", align_corners=False)[0, 0].numpy()

    def to_source(self, labels: np.ndarray) -> np.ndarray:
        """Labels on the network grid back on the source grid (nearest neighbour), shaped like the image."""
        if labels.shape != self.shape:
            raise ValueError(f"labels have shape {labels.shape}, the network grid is {self.shape}")
        index = [np.minimum(((np.arange(n) + 0.5) * (m / n)).astype(np.int64), m - 1)
                 for n, m in zip(self.oriented, self.shape, strict=True)]
        oriented = labels[np.ix_(*index)]
        oriented = oriented[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.ascontiguousarray(np.transpose(oriented, np.argsort(self.axes)))

    def _orient(self, volume: np.ndarray) -> np.ndarray:
        if volume.shape != self.source_shape:
            raise ValueError(f"volume has shape {volume.shape}, the grid was made for {self.source_shape}")
        oriented = np.transpose(volume, self.axes)
        return oriented[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]


def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """HU mapped linearly so that `low` -> 0 and `high` -> 1, clipped to [0, 1] (float32)."""
    out = (hu.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


# --- the plugin -----------------------------------------------------------------------------------------


class OrganSegmenter(TorchPlugin[OrganSegConfig]):
    """13 abdominal organs on CT by a SwinUNETR; a SEG segment and a volume (mL) per organ found. `load`
    (TorchPlugin): the SwinUNETR from the weights (backend "torch") or model.onnx (backend "onnx"); it also
    raises WeightsUnavailable for a label the manifest does not declare."""

    config_model = OrganSegConfig

    def load(self, device: str, weights: Path | None) -> None:
        super().load(device, weights)
        log.debug("ct-organ-seg loaded: backend %s on %s, feature_size %d, %d labels", self.config.backend,
                  self.device, self.config.feature_size, len(self.config.labels))

    def read_config(self, weights: Path | None) -> OrganSegConfig:
        return parse_config(self.manifest, merged_config(self.manifest, weights))

    def new_network(self) -> Any:
        return network_for(self.config)

    def check_onnx(self, onnx: OnnxModel, path: Path) -> None:
        """Raises WeightsUnavailable when model.onnx takes other windows or gives other channels."""
        inputs, outputs = onnx.session.get_inputs(), onnx.session.get_outputs()
        spatial = [int(d) if isinstance(d, int) else None for d in inputs[0].shape[2:]]
        channels = outputs[0].shape[1]
        if len(inputs) != 1 or spatial != list(self.config.roi_size) or channels != 1 + len(self.config.labels):
            raise WeightsUnavailable(
                f"{path.name} takes {inputs[0].shape} and gives {outputs[0].shape}; the configuration needs "
                f"windows of {list(self.config.roi_size)} and {1 + len(self.config.labels)} output channels: "
                "export it again (radnode export-onnx)")

    def run(self, image: Image) -> Findings:
        if image.kind != "volume":
            return Findings.not_applicable_because(f"needs a CT volume, got {image.kind}")
        if image.modality != "CT":
            return Findings.not_applicable_because(f"needs CT, got {image.modality}")
        cfg = self.config
        t0 = time.perf_counter()
        try:
            grid = ModelGrid.of(image.pixels.shape, image.spacing, image.direction, cfg.spacing, cfg.orientation)
        except ValueError as exc:
            return Findings.not_applicable_because(str(exc))
        x = window(grid.to_model(image.pixels), *cfg.hu_window)
        t1 = time.perf_counter()
        labels = grid.to_source(self.predict_labels(x))
        t2 = time.perf_counter()
        findings = organ_findings(labels, cfg.labels, image.spacing)
        log.debug("ct-organ-seg %s -> network grid %s: pre-process %.2f s, inference %.2f s, post-process %.2f s",
                  image.pixels.shape, grid.shape, t1 - t0, t2 - t1, time.perf_counter() - t2)
        return findings

    def predict_labels(self, x: np.ndarray) -> np.ndarray:
        """Sliding-window inference on a preprocessed volume (network grid); the arg-max label per voxel."""
        import torch
        from monai.inferers import sliding_window_inference

        cfg = self.config
        predictor: Callable[[Any], Any] = self.net if self.onnx is None else self._onnx_predict
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None].to(self.device)
        with autocast(self.device):
            logits = sliding_window_inference(inputs, roi_size=cfg.roi_size, sw_batch_size=cfg.sw_batch_size,
                                              predictor=predictor, overlap=cfg.overlap, mode=cfg.mode)
            labels = torch.argmax(torch.as_tensor(logits), dim=1)[0]
        return labels.to(torch.uint8).cpu().numpy()

    def _onnx_predict(self, windows: Any) -> Any:
        """A batch of windows through ONNX Runtime (numpy in, numpy out), back as a tensor on their device."""
        import torch

        assert self.onnx is not None
        (logits,) = self.onnx(windows.detach().float().cpu().numpy())
        return torch.from_numpy(logits).to(windows.device)

    def export_onnx(self, path: Path) -> dict[str, Any]:
        """Export the loaded network at one `roi_size` window (dynamic batch) and compare ONNX Runtime's logits
        with torch's (float32) on a random window. Raises RuntimeError when loaded with backend "onnx"."""
        import torch

        if self.net is None:
            raise RuntimeError("ct-organ-seg is loaded with backend onnx: there is no torch model to export")
        shape = (1, 1, *self.config.roi_size)
        sample = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        with warnings.catch_warnings():
            # the tracer freezes SwinUNETR's shape checks and window padding at this window size: intended
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            export_onnx(self.net, [sample], path, [INPUT_NAME], [OUTPUT_NAME],
                        {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        with torch.inference_mode():
            expected = self.net(sample).float().cpu().numpy()
        (got,) = OnnxModel(path, self.device)(sample.cpu().numpy())
        return {"max_abs_diff": float(np.max(np.abs(got - expected))), "path": str(path), "input_shape": list(shape),
                "max_abs_logit": float(np.max(np.abs(expected)))}


def organ_findings(labels: np.ndarray, organs: Sequence[str], spacing: Sequence[float]) -> Findings:
    """One segmentation and one volume (mL, voxel count x voxel volume) per organ present in `labels`
    (0 = background, i = organs[i - 1]), a warning for organs cut off by the first or last slice, a summary."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(organs) + 1)
    edge = set(np.unique(labels[0]).tolist()) | set(np.unique(labels[-1]).tolist())
    segmentations, measurements, found, missing, cut = [], [], [], [], []
    for value, organ in enumerate(organs, start=1):
        if not counts[value]:
            missing.append(organ)
            continue
        volume = round(int(counts[value]) * voxel_ml, 2)
        segmentations.append(Segmentation(organ, labels == value))
        measurements.append(Measurement(VOLUME, volume, "mL", organ))
        found.append(f"{organ} {volume:.1f} mL")
        if value in edge:
            cut.append(organ)
    warnings_ = []
    if cut:
        warnings_.append(f"cut off by the first or last slice, volume underestimated: {', '.join(cut)}")
    summary = f"{len(found)} of {len(organs)} organs: " + ("; ".join(found) if found else "none found")
    if found and missing:
        summary += f"; not found: {', '.join(missing)}"
    return Findings(segmentations=segmentations, measurements=measurements, warnings=warnings_, summary=summary)


def build(manifest: Manifest) -> OrganSegmenter:
    return OrganSegmenter(manifest)
