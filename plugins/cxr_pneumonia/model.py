"""cxr-pneumonia model: letterbox a chest X-ray, classify it with a timm ViT, map the attention rollout back.

Pre-process (`preprocess`, numpy + Pillow, shared by both backends): the core hands over a display-ready
grey image in [0, 1] with high = bright (Modality/VOI LUT applied, MONOCHROME1 inverted, so lungs are dark
whatever the photometric interpretation). It is resized with its aspect ratio kept so that its longer side
is `img_size` (Pillow bilinear, which averages over the source pixels when shrinking), centred on an
`img_size` x `img_size` black canvas (0 = the darkest grey, like collimated film borders), copied into 3
channels and normalised per channel with `mean` / `std`. Letterboxing never stretches the anatomy; the
`Letterbox` records where the image lies on the canvas so that the heatmap can be mapped back.

Predict: torch (the safetensors weights in a timm VisionTransformer, strict loading, CUDA autocast) or ONNX
Runtime (`model.onnx` beside the weights, written by `export_onnx`). Both return the logits and the
attention rollout over the patch grid.

Post-process: softmax -> the PNEUMONIA probability as a Classification with the configured threshold; the
heatmap is the attention rollout (Abnar & Zuidema 2020): per block the head-averaged attention
probabilities plus the identity (the residual path), 0.5 each, multiplied from the first block to the last;
the class token's row over the patch tokens says how much each patch fed the classification. The patch
grid is interpolated bilinearly onto the original image geometry (undoing the resize and the padding; only
patches that hold image contribute) and scaled to [0, 1] (min to max over the image). It is a relative
map: where the model looked, not a lesion outline, and it is drawn whatever the decision.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from pydantic import Field, field_validator
from timm.models.vision_transformer import VisionTransformer

from plugins.base import Classification, Findings, Heatmap, Image, Manifest, WeightsUnavailable
from plugins.cxr_pneumonia import HEATMAP, PNEUMONIA
from plugins.torch_common import OnnxModel, TorchConfig, TorchPlugin, autocast, export_onnx, validated_config
from plugins.xray import Letterbox, Std, heatmap_to_image, letterbox, normalise  # noqa: F401  (re-exported)

POSITIVE_CLASS = "PNEUMONIA"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "attention_rollout")


class CxrConfig(TorchConfig):
    """The plugin's merged configuration (manifest `config` + config.json), validated."""

    model_name: str = Field(min_length=1)
    img_size: int = Field(ge=16, le=2048)
    model_kwargs: dict[str, Any]
    mean: tuple[float, float, float]
    std: Std
    threshold: float = Field(ge=0.0, le=1.0)
    classes: tuple[str, str]

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: tuple[str, str]) -> tuple[str, str]:
        if POSITIVE_CLASS not in v or len(set(v)) != 2:
            raise ValueError(f"classes must be two different names, one of them {POSITIVE_CLASS}")
        return v

    @property
    def positive(self) -> int:
        """Index of the PNEUMONIA output."""
        return self.classes.index(POSITIVE_CLASS)


def read_config(config: dict[str, Any]) -> CxrConfig:
    """Validate a merged configuration. Raises WeightsUnavailable naming the bad keys."""
    return validated_config(CxrConfig, config, "cxr-pneumonia")


# --- pre-process -------------------------------------------------------------------------------------------


def preprocess(pixels: np.ndarray, config: CxrConfig) -> tuple[np.ndarray, Letterbox]:
    """The model input (1, 3, img_size, img_size) for a display-ready grey X-ray, and its letterbox.
    Raises ValueError for an image that is not 2-D."""
    canvas, box = letterbox(pixels, config.img_size)
    return normalise(canvas, config.mean, config.std), box


# --- predict -------------------------------------------------------------------------------------------------


def create_model(config: CxrConfig) -> VisionTransformer:
    """The configured timm VisionTransformer with random weights (pretrained=False: nothing is downloaded).
    Raises WeightsUnavailable when timm cannot build it or it is not a ViT with a class token."""
    try:
        model = timm.create_model(config.model_name, pretrained=False, num_classes=len(config.classes),
                                  img_size=config.img_size, **config.model_kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise WeightsUnavailable(f"timm cannot build {config.model_name} with {config.model_kwargs}: {exc}") from None
    attention = all(hasattr(b, "attn") and hasattr(b.attn, "attn_drop") and hasattr(b.attn, "fused_attn")
                    for b in getattr(model, "blocks", []))
    if not isinstance(model, VisionTransformer) or model.cls_token is None or not attention:
        raise WeightsUnavailable(f"{config.model_name} is not a timm VisionTransformer with a class token and "
                                 "standard attention blocks: the attention rollout needs one")
    patch = tuple(model.patch_embed.patch_size)
    if config.img_size % patch[0] or config.img_size % patch[1]:
        raise WeightsUnavailable(f"img_size {config.img_size} is not a multiple of {config.model_name}'s patch size "
                                 f"{patch}: the patch grid would not cover the input")
    return model


def attention_rollout(maps: list[torch.Tensor], prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Attention rollout (B, grid rows, grid cols) from each block's attention probabilities (B, heads, N, N):
    the class token's row of prod_l (0.5 A_l + 0.5 I) over the patch tokens (rows stay stochastic)."""
    eye = torch.eye(maps[0].shape[-1], dtype=torch.float32, device=maps[0].device)
    result = None
    for attn in maps:
        step = 0.5 * attn.float().mean(dim=1) + 0.5 * eye
        result = step if result is None else step @ result
    return result[:, 0, prefix:].unflatten(-1, tuple(grid))


class RolloutViT(torch.nn.Module):
    """A timm VisionTransformer that returns (logits, attention rollout over its patch grid).

    The blocks use timm's explicit softmax attention (not the fused kernel) so that forward hooks on the
    attention dropout (an identity in eval mode) see the attention probabilities; this traces into ONNX.
    One call at a time per instance (the hooks collect into the instance), as a worker process runs jobs."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self._maps: list[torch.Tensor] = []
        for block in vit.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._maps.append(output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._maps.clear()
        logits = self.vit(x)
        maps, self._maps = self._maps, []
        return logits, attention_rollout(maps, self.vit.num_prefix_tokens, tuple(self.vit.patch_embed.grid_size))


# --- post-process ----------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# --- the plugin ----------------------------------------------------------------------------------------------


class CxrPneumonia(TorchPlugin[CxrConfig]):
    """NORMAL vs PNEUMONIA on a frontal chest X-ray: the PNEUMONIA probability and an attention heatmap.
    `load` (TorchPlugin): the ViT from the weights, wrapped in a RolloutViT (backend "torch"), or model.onnx
    (backend "onnx"; an ONNX model without the attention output runs without heatmap)."""

    config_model = CxrConfig
    net: RolloutViT | None = None
    _onnx_rollout: bool = False

    def load(self, device: str, weights: Path | None) -> None:
        super().load(device, weights)
        if self.net is not None:
            self.net = RolloutViT(self.net).to(self.device).eval()

    def new_network(self) -> VisionTransformer:
        return create_model(self.config)

    def check_onnx(self, onnx: OnnxModel, path: Path) -> None:
        """Raises WeightsUnavailable for an ONNX model of another input size or class count; notes whether it
        has the attention-rollout output."""
        inputs, outputs = onnx.session.get_inputs(), onnx.session.get_outputs()
        size = self.config.img_size
        if len(inputs) != 1 or [d for d in inputs[0].shape[-2:] if isinstance(d, int)] not in ([], [size, size]):
            raise WeightsUnavailable(f"{path}: input {[(i.name, i.shape) for i in inputs]} does not take one "
                                     f"{size} x {size} image (img_size in config.json)")
        classes = outputs[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.config.classes):
            raise WeightsUnavailable(f"{path}: {classes} outputs, the configuration names {len(self.config.classes)}"
                                     " classes")
        self._onnx_rollout = len(outputs) > 1 and len(outputs[1].shape) == 3

    def _predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (1, classes) and the rollout grid (1, gh, gw) (None from an ONNX model without it)."""
        if self.onnx is not None:
            outputs = self.onnx(x)
            return outputs[0], outputs[1] if self._onnx_rollout else None
        with autocast(self.device):
            logits, rollout = self.net(torch.from_numpy(x).to(self.device))
        return logits.float().cpu().numpy(), rollout.float().cpu().numpy()

    def run(self, image: Image) -> Findings:
        """The PNEUMONIA probability and the attention heatmap of a 2-D X-ray; not applicable to other images.
        Raises RuntimeError when the plugin is not loaded."""
        if not self.loaded:
            raise RuntimeError("cxr-pneumonia is not loaded: call load() first")
        if image.kind != "image2d":
            return Findings.not_applicable_because(f"needs a 2-D X-ray image, got {image.kind}")
        x, box = preprocess(image.pixels, self.config)
        logits, rollout = self._predict(x)
        probability = float(np.clip(softmax(logits[0])[self.config.positive], 0.0, 1.0))
        finding = Classification(PNEUMONIA, probability, self.config.threshold)
        if finding.positive:
            summary = f"{POSITIVE_CLASS} (p={probability:.2f})"
        else:
            summary = f"{self.config.classes[1 - self.config.positive]} (p={1.0 - probability:.2f})"
        heatmaps, warnings = [], []
        if rollout is not None:
            heatmaps.append(Heatmap(HEATMAP, heatmap_to_image(rollout[0], box),
                                    quantity="attention rollout (relative)"))
        else:
            warnings.append("the ONNX model has no attention output: no heatmap")
        return Findings(classifications=[finding], heatmaps=heatmaps, warnings=warnings, summary=summary)

    def export_onnx(self, path: Path) -> dict[str, Any]:
        """Export the loaded torch model with its attention-rollout output (inputs "image" (B, 3, S, S),
        outputs "logits" and "attention_rollout", dynamic batch) and compare ONNX Runtime with torch (float32)
        on a sample letterboxed input. Returns max_abs_diff (logits), probability_max_abs_diff,
        rollout_max_abs_diff and path. Raises RuntimeError when the plugin runs the ONNX backend."""
        if self.net is None:
            raise RuntimeError("export_onnx needs the torch backend (backend \"torch\" in config.json)")
        size = self.config.img_size
        canvas, _ = letterbox(np.random.default_rng(0).random((size, size * 3 // 4), dtype=np.float32), size)
        sample = normalise(canvas, self.config.mean, self.config.std)
        tensor = torch.from_numpy(sample).to(self.device)
        with warnings.catch_warnings():  # timm's shape asserts are constants for a fixed input size
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            export_onnx(self.net, [tensor], path, [INPUT_NAME], list(OUTPUT_NAMES),
                        {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}})
        onnx_logits, onnx_rollout = OnnxModel(path, self.device)(sample)
        with autocast(self.device, enabled=False):
            logits, rollout = (t.float().cpu().numpy() for t in self.net(tensor))
        return {
            "max_abs_diff": float(np.max(np.abs(onnx_logits - logits))),
            "probability_max_abs_diff": float(np.max(np.abs(softmax(onnx_logits) - softmax(logits)))),
            "rollout_max_abs_diff": float(np.max(np.abs(onnx_rollout - rollout))),
            "path": str(path),
        }


def build(manifest: Manifest) -> CxrPneumonia:
    return CxrPneumonia(manifest)
