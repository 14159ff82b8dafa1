"""cxr-foundation model: preprocessing, the timm DINOv2 backbone with its heads, embeddings, findings, ONNX.

Preprocessing (`preprocess`, the same for CR, DX and secondary captures): the loader's display-ready image
(float in [0, 1], MONOCHROME1 already inverted) is resized with its aspect ratio kept so that its longer side
is `img_size` (bilinear, antialiased), centred on a black `img_size` square, copied to 3 channels and
normalised with the configured mean and std (ImageNet's, as DINOv2 was trained).

Embeddings (`CxrFoundation.embed`): the tokens of the final layer and of the penultimate block, both after the
backbone's final LayerNorm (as DINOv2's `get_intermediate_layers(norm=True)`), split into `cls` (D),
`registers` (R, D) and `patches` (N, D), N = (img_size / patch_size)^2 = 1369 at 518 px.

Findings (`CxrFoundation.run`): per configured finding, the pooled head's probability with its threshold
(config "thresholds" over the heads file's); for each positive finding a heatmap: the patch head's logits on
the patch grid, resized back through the padding and the resize onto the original image, then the logistic
function (values in [0, 1]). See `heads.py` for what the heads compute and how they are trained.

Backends (`TorchPlugin.load`): "torch" (the safetensors backbone) or "onnx" (`<models dir>/cxr-foundation/model.onnx`
written by `export_onnx`: backbone and heads in one graph, refused when the heads file changed since the export).

Capabilities of the plugin contract: `load_embedder` + `embed_studies` (`radnode embed`, see `embed.py`) and
`train_heads` (`radnode train-head`, see `heads.py`); both hand the file to write back to the CLI.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from plugins.base import (
    Classification,
    Findings,
    Heatmap,
    Image,
    Manifest,
    NotApplicable,
    TrainedHeads,
    WeightsUnavailable,
)
from plugins.cxr_foundation import FINDINGS
from plugins.cxr_foundation.embed import EmbeddingSet, embed_paths
from plugins.cxr_foundation.heads import HeadsFile, load_heads, sigmoid, train_heads_from_files
from plugins.registry import sha256_file
from plugins.torch_common import (
    OnnxModel,
    TorchConfig,
    TorchPlugin,
    autocast,
    export_onnx,
    merged_config,
    validated_config,
)
from plugins.xray import Letterbox, Std, grid_to_image, letterbox, normalise

OUTPUTS = ("tokens", "penultimate_tokens", "logits", "patch_logits")  # the network's (and the ONNX graph's)
ONNX_META_KEYS = ("model_name", "img_size", "findings", "heads_sha256")  # checked when backend "onnx" loads


class FoundationConfig(TorchConfig):
    """The plugin's configuration (the manifest's `config` with config.json applied), validated."""

    model_name: str = Field(min_length=1)
    img_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    num_registers: int = Field(ge=0)
    model_kwargs: dict[str, Any]
    mean: tuple[float, float, float]
    std: Std
    heads_file: str = Field(min_length=1)
    findings: list[str] = Field(min_length=1)
    thresholds: dict[str, float]

    @field_validator("heads_file")
    @classmethod
    def _heads_file(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"heads_file must be a file name in the plugin's models folder, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FoundationConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        unknown = [f for f in self.findings if f not in FINDINGS]
        if unknown or len(set(self.findings)) != len(self.findings):
            raise ValueError(f"findings must be unique keys of {', '.join(FINDINGS)}; got {self.findings}")
        for key, value in self.thresholds.items():
            if key not in self.findings or not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds: {key!r}: {value} (keys must be configured findings, values in [0, 1])")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def read_config(manifest: Manifest, weights: Path | None) -> FoundationConfig:
    """The merged configuration, validated. Raises WeightsUnavailable (a bad config.json)."""
    where = weights.parent / "config.json" if weights is not None else "the manifest"
    return validated_config(FoundationConfig, merged_config(manifest, weights), f"{manifest.name} ({where})")


# --- preprocessing -------------------------------------------------------------------------------------


def preprocess(pixels: np.ndarray, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
               ) -> tuple[np.ndarray, Letterbox]:
    """A display-ready 2-D image (float, [0, 1], high = bright) -> the (3, img_size, img_size) float32 model
    input and where the image lies on it (plugins.xray: aspect kept, centred on black). Values outside
    [0, 1] are clipped, NaN becomes 0. Raises ValueError for an array that is not a non-empty 2-D image."""
    canvas, box = letterbox(pixels, img_size)
    return normalise(canvas, mean, std)[0], box


# --- the network ---------------------------------------------------------------------------------------


def build_backbone(config: FoundationConfig) -> nn.Module:
    """The timm ViT the configuration names, randomly initialised (never downloaded). Raises WeightsUnavailable
    when the model does not exist or disagrees with patch_size / num_registers / img_size."""
    import timm

    try:
        vit = timm.create_model(config.model_name, pretrained=False, num_classes=0, img_size=config.img_size,
                                **config.model_kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:  # timm: unknown model; ViT: bad keyword arguments
        raise WeightsUnavailable(f"cannot build {config.model_name} with {config.model_kwargs}: {exc}") from exc
    patch = tuple(getattr(getattr(vit, "patch_embed", None), "patch_size", ()))
    if not hasattr(vit, "forward_intermediates") or getattr(vit, "cls_token", None) is None:
        raise WeightsUnavailable(f"{config.model_name} is not a timm ViT with a class token")
    if patch != (config.patch_size, config.patch_size) or vit.num_reg_tokens != config.num_registers:
        raise WeightsUnavailable(f"{config.model_name} has patches {patch} and {vit.num_reg_tokens} registers; the "
                                 f"configuration says {config.patch_size} and {config.num_registers}")
    if tuple(vit.patch_embed.grid_size) != (config.grid, config.grid):
        raise WeightsUnavailable(f"{config.model_name} has a {vit.patch_embed.grid_size} patch grid at "
                                 f"{config.img_size} px, expected {config.grid} x {config.grid}")
    return vit


class Network(nn.Module):
    """Backbone (+ heads): image batch -> final tokens, penultimate tokens (+ logits, patch logits)."""

    def __init__(self, vit: nn.Module, heads: nn.Module | None = None) -> None:
        super().__init__()
        self.vit = vit
        self.heads = heads
        self.penultimate = len(vit.blocks) - 2 if len(vit.blocks) > 1 else 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        final, [(patches, prefix)] = self.vit.forward_intermediates(
            x, indices=[self.penultimate], norm=True, output_fmt="NLC", return_prefix_tokens=True)
        penultimate = torch.cat([prefix, patches], dim=1)
        if self.heads is None:
            return final, penultimate
        with torch.autocast(final.device.type, enabled=False):  # heads in float32 (the backbone may run in bf16)
            tokens = final.float()
            logits, patch_logits = self.heads(tokens[:, 0], tokens[:, self.vit.num_prefix_tokens:])
        return final, penultimate, logits, patch_logits


def split_tokens(tokens: np.ndarray, registers: int, prefix: str = "") -> dict[str, np.ndarray]:
    """(B, 1 + R + N, D) tokens -> {cls (B, D), registers (B, R, D), patches (B, N, D)} with key prefix."""
    return {f"{prefix}cls": tokens[:, 0], f"{prefix}registers": tokens[:, 1:1 + registers],
            f"{prefix}patches": tokens[:, 1 + registers:]}


# --- the plugin ----------------------------------------------------------------------------------------


class CxrFoundation(TorchPlugin[FoundationConfig]):
    """DINOv2 ViT-L/14 (+4 registers) embeddings of a chest X-ray and trained heads per finding."""

    config_model = FoundationConfig
    weights_name = "backbone weights"
    heads: HeadsFile | None = None
    network: Network | None = None  # backbone (`net`, backend "torch") + heads
    weights: Path | None = None
    _sha: str | None = None

    def load(self, device: str, weights: Path | None, heads: bool = True) -> None:
        """Load the backbone (backend "torch": `weights`; backend "onnx": model.onnx beside it, which holds
        backbone and heads) and, unless `heads` is False (embedding only), the heads file.

        Raises WeightsUnavailable when a file is missing or does not fit the configuration, when the heads
        were trained on embeddings of another backbone, or when model.onnx was exported from other heads."""
        self.weights, self._sha, self.heads, self.network = weights, None, None, None
        super().load(device, weights)
        assert weights is not None  # TorchPlugin.load refuses None
        if heads:
            self.heads = self._load_heads(weights.parent, None if self.net is None else int(self.net.embed_dim))
            if self.onnx is not None and self.onnx_file is not None:
                self._check_onnx(self.onnx_file, self.onnx, ONNX_META_KEYS)
        if self.net is not None:
            self.network = Network(self.net, self.heads.heads if self.heads else None).eval().to(self.device)

    def read_config(self, weights: Path | None) -> FoundationConfig:
        return read_config(self.manifest, weights)

    def new_network(self) -> nn.Module:
        return build_backbone(self.config)

    def check_onnx(self, onnx: OnnxModel, path: Path) -> None:
        """Raises WeightsUnavailable when model.onnx was exported for another model or image size; takes the
        backbone's SHA-256 from what the export recorded."""
        self._sha = onnx.session.get_modelmeta().custom_metadata_map.get("backbone_sha256")
        self._check_onnx(path, onnx, ("model_name", "img_size"))

    # --- capabilities: `radnode embed` and `radnode train-head` ------------------------------------------

    def load_embedder(self, device: str, weights: Path | None) -> None:
        """`load` without the heads: embedding needs the backbone only. Raises WeightsUnavailable."""
        self.load(device, weights, heads=False)

    def embed_studies(self, items: Sequence[tuple[str, Sequence[Path]]], load: Callable[[Sequence[Path]], Image],
                      *, batch_size: int = 8, patches: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> EmbeddingSet:
        """`embed.embed_paths` with this plugin. Raises ValueError, RuntimeError."""
        return embed_paths(self, items, load, batch_size=batch_size, progress=progress, patches=patches)

    def train_heads(self, embeddings: Path, labels: Path, *, seed: int = 0, val_fraction: float = 0.2,
                    epochs: int = 100, hidden: int = 0) -> TrainedHeads:
        """`heads.train_heads_from_files`: the report and the heads file's bytes. Raises ValueError, OSError."""
        report, content = train_heads_from_files(embeddings, labels, seed=seed, val_fraction=val_fraction,
                                                 epochs=epochs, hidden=hidden)
        return TrainedHeads(report, content)

    def _load_heads(self, folder: Path, dim: int | None) -> HeadsFile:
        config = self.config
        loaded = load_heads(folder / config.heads_file, dim)
        if loaded.findings != config.findings:
            raise WeightsUnavailable(f"{config.heads_file} has heads for {loaded.findings}, the configuration lists "
                                     f'{config.findings}: set "findings" in config.json to the heads\' findings')
        trained_on = loaded.meta.get("backbone_sha256")
        if trained_on and trained_on != self.backbone_sha256:
            raise WeightsUnavailable(f"{config.heads_file} was trained on embeddings of another backbone "
                                     f"(SHA-256 {trained_on[:12]}..., this one {str(self.backbone_sha256)[:12]}...)")
        return loaded

    @property
    def backbone_sha256(self) -> str | None:
        """SHA-256 of the backbone weights (torch: of the file, computed once; onnx: recorded at the export)."""
        if self._sha is None and self.onnx is None and self.weights is not None:
            self._sha = sha256_file(self.weights)
        return self._sha

    def _onnx_meta(self, keys: tuple[str, ...]) -> dict[str, str]:
        """What model.onnx records (at the export) about the configuration and files it came from."""
        assert self.weights is not None
        values = {"model_name": self.config.model_name, "img_size": str(self.config.img_size),
                  "findings": json.dumps(self.config.findings)}
        if "heads_sha256" in keys:
            values["heads_sha256"] = sha256_file(self.weights.parent / self.config.heads_file)
        if "backbone_sha256" in keys:
            values["backbone_sha256"] = str(self.backbone_sha256)
        return {k: values[k] for k in keys}

    def _check_onnx(self, path: Path, onnx: OnnxModel, keys: tuple[str, ...]) -> None:
        exported = onnx.session.get_modelmeta().custom_metadata_map
        expected = self._onnx_meta(keys)
        stale = [k for k in keys if exported.get(k) != expected[k]]
        if stale:
            raise WeightsUnavailable(f"{path} was exported with another {', '.join(stale)} than the configuration "
                                     "and heads file in force: run `radnode export-onnx` again")

    # --- inference ---------------------------------------------------------------------------------------

    def prepare(self, image: Image) -> tuple[np.ndarray, Letterbox]:
        """The model input for one image. Raises NotApplicable for anything but a 2-D X-ray image."""
        if image.kind != "image2d" or image.pixels.ndim != 2:
            raise NotApplicable(f"needs a 2-D X-ray image (CR, DX or a secondary capture), got {image.kind} "
                                f"{image.modality} {tuple(image.pixels.shape)}")
        return preprocess(image.pixels, self.config.img_size, self.config.mean, self.config.std)

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, S, S) model inputs -> the network's outputs as float32 arrays (logits and patch_logits only
        with heads). Raises RuntimeError when not loaded."""
        if self.onnx is not None:
            values = self.onnx(batch)
        elif self.network is not None:
            with autocast(self.device):
                values = [v.float().cpu().numpy() for v in self.network(torch.from_numpy(batch).to(self.device))]
        else:
            raise RuntimeError("the plugin is not loaded")
        out = dict(zip(OUTPUTS, values, strict=False))
        if self.heads is None:
            out = {k: out[k] for k in OUTPUTS[:2]}
        return out

    def embed_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, S, S) model inputs -> cls (B, D), registers (B, R, D), patches (B, N, D) of the final layer,
        and the same with the prefix "penultimate_" for the penultimate block. Raises RuntimeError."""
        out = self.forward(batch)
        r = self.config.num_registers
        return split_tokens(out["tokens"], r) | split_tokens(out["penultimate_tokens"], r, "penultimate_")

    def embed(self, image: Image) -> dict[str, np.ndarray]:
        """One image's embeddings: cls (D), registers (R, D), patches (N, D) and penultimate_cls,
        penultimate_registers, penultimate_patches. Raises NotApplicable, RuntimeError."""
        array, _ = self.prepare(image)
        return {k: v[0] for k, v in self.embed_batch(array[None]).items()}

    def embedding_meta(self) -> dict[str, Any]:
        """What made the embeddings (stored with them)."""
        c = self.config
        return {"plugin": self.manifest.name, "plugin_version": self.manifest.version, "model_name": c.model_name,
                "model_kwargs": c.model_kwargs, "img_size": c.img_size, "patch_size": c.patch_size,
                "num_registers": c.num_registers, "mean": list(c.mean), "std": list(c.std),
                "backbone_sha256": self.backbone_sha256,
                "layers": {"final": "last block, final LayerNorm",
                           "penultimate": "second-to-last block, final LayerNorm"}}

    def run(self, image: Image) -> Findings:
        if self.heads is None:
            raise RuntimeError("the plugin was loaded without heads: it can embed, not classify")
        try:
            array, box = self.prepare(image)
        except NotApplicable as exc:
            return Findings.not_applicable_because(str(exc))
        out = self.forward(array[None])
        probabilities = sigmoid(out["logits"][0])
        file_thresholds = self.heads.heads.thresholds.numpy()
        classifications = []
        for k, key in enumerate(self.config.findings):
            threshold = self.config.thresholds.get(key, float(file_thresholds[k]))
            classifications.append(Classification(FINDINGS[key], float(probabilities[k]), float(threshold)))
        positive = [k for k, c in enumerate(classifications) if c.positive]
        heatmaps = []
        if positive:
            grid = self.config.grid
            maps = [grid_to_image(g, box) for g in out["patch_logits"][0, positive].reshape(len(positive), grid, grid)]
            heatmaps = [Heatmap(classifications[k].concept.meaning, np.clip(sigmoid(m), 0.0, 1.0).astype(np.float32),
                                quantity=f"patch probability of {classifications[k].concept.meaning}"[:64])
                        for k, m in zip(positive, maps, strict=True)]
        return Findings(classifications=classifications, heatmaps=heatmaps, summary=_summary(classifications))

    # --- ONNX ----------------------------------------------------------------------------------------------

    def export_onnx(self, path: Path) -> dict[str, Any]:
        """Export backbone + heads (input "image" (B, 3, S, S), outputs tokens, penultimate_tokens, logits,
        patch_logits; batch dynamic) and compare ONNX Runtime with torch (float32) on two sample images.
        Returns {"max_abs_diff", "max_abs_diff_by_output", "path"}. Raises RuntimeError when the plugin
        is not loaded with heads on the torch backend."""
        if self.network is None or self.heads is None:
            raise RuntimeError("export needs the plugin loaded with heads on the torch backend")
        batch = np.stack([preprocess(p, self.config.img_size, self.config.mean, self.config.std)[0]
                          for p in _sample_images(self.config.img_size)])
        example = torch.from_numpy(batch[:1]).to(self.device)
        dynamic = {name: {0: "batch"} for name in ("image", *OUTPUTS)}
        with warnings.catch_warnings():  # timm's input-size assertions become constants: the export is at img_size
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            export_onnx(self.network, [example], path, ["image"], list(OUTPUTS), dynamic)
        import onnx

        model = onnx.load(str(path))
        for key, value in self._onnx_meta((*ONNX_META_KEYS, "backbone_sha256")).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(path))
        del model
        with torch.inference_mode():
            reference = [v.float().cpu().numpy() for v in self.network(torch.from_numpy(batch).to(self.device))]
        got = OnnxModel(path, self.device)(batch)
        diffs = {name: float(np.max(np.abs(a - b))) for name, a, b in zip(OUTPUTS, reference, got, strict=True)}
        return {"max_abs_diff": max(diffs.values()), "max_abs_diff_by_output": diffs, "path": str(path)}


def _sample_images(size: int) -> list[np.ndarray]:
    """Two deterministic test images (portrait and landscape) for the ONNX parity check."""
    rng = np.random.default_rng(0)
    return [rng.random((size, size * 3 // 4)).astype(np.float32), rng.random((size // 2, size)).astype(np.float32)]


def _summary(classifications: list[Classification]) -> str:
    positive = [c for c in classifications if c.positive]
    if not positive:
        return f"No finding above its threshold ({len(classifications)} assessed)"
    listed = ", ".join(f"{c.concept.meaning.lower()} {c.probability:.2f}" for c in positive)
    rest = len(classifications) - len(positive)
    return f"Above threshold: {listed}" + (f"; {rest} other finding(s) below" if rest else "")


def build(manifest: Manifest) -> CxrFoundation:
    return CxrFoundation(manifest)
