"""Infer step, model side: build and load a plugin with its weights on its device, once per worker process
(or once per CLI command); `node.pipeline.run` then runs it on series."""

from __future__ import annotations

import logging

from node.settings import Settings
from plugins.base import Manifest, Plugin
from plugins.registry import build, sha256_file, weights_path

log = logging.getLogger(__name__)


def resolve_device(setting: str, manifest: Manifest) -> str:
    """The device a plugin runs on: the setting, or for "auto" CUDA for GPU-queue plugins when present."""
    if setting != "auto":
        return setting
    if manifest.queue != "gpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_plugin(manifest: Manifest, settings: Settings, backend: str | None = None) -> tuple[Plugin, str | None]:
    """Build and load a plugin with its weights; returns it and the SHA-256 of the model file in use (the
    weights, or model.onnx with backend "onnx"; None when it needs none). A torch plugin with backend "auto" on a
    CPU settles its backend (exports to ONNX and checks parity the first time: `TorchPlugin.settle_backend`);
    `backend` ("torch" or "onnx") overrides the configuration's.

    Raises WeightsUnavailable, PluginLoadError or whatever the plugin's load raises.
    """
    from plugins.torch_common import TorchPlugin

    path = weights_path(manifest, settings.models_path)
    folder = settings.models_path / manifest.name
    files = manifest.files(folder, manifest.config_in(folder))  # the model file in use comes first
    model_file = files[0][1] if files else None
    sha = sha256_file(model_file) if model_file is not None and model_file.is_file() else None
    plugin = build(manifest)
    if isinstance(plugin, TorchPlugin):
        plugin.backend_override = backend
    plugin.load(resolve_device(settings.device, manifest), path)
    if isinstance(plugin, TorchPlugin) and path is not None:
        plugin.settle_backend(path)
        log.info("%s runs on %s with %s", manifest.name, plugin.device, plugin.backend)
    return plugin, sha
