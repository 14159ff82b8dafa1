"""Infer and encode steps shared by the Celery worker and the offline `radnode infer`: load a plugin,
build its Image from DICOM files, run and validate it, write the result objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from node.dicom.bodypart import normalise_body_part
from node.imaging import load_image
from node.results.common import Provenance
from node.results.outputs import read_sources, write_outputs
from node.settings import Settings
from plugins.base import Findings, Image, Manifest, Plugin
from plugins.registry import build, sha256_file, weights_path


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


def load_plugin(manifest: Manifest, settings: Settings) -> tuple[Plugin, str | None]:
    """Build and load a plugin with its weights; returns it and the SHA-256 of the model file in use (the
    weights, or model.onnx with backend "onnx"; None when it needs none).

    Raises WeightsUnavailable, PluginLoadError or whatever the plugin's load raises.
    """
    path = weights_path(manifest, settings.models_path)
    folder = settings.models_path / manifest.name
    files = manifest.files(folder, manifest.config_in(folder))  # the model file in use comes first
    model_file = files[0][1] if files else None
    sha = sha256_file(model_file) if model_file is not None and model_file.is_file() else None
    plugin = build(manifest)
    plugin.load(resolve_device(settings.device, manifest), path)
    return plugin, sha


def load_series_image(paths: Sequence[Path], manifest: Manifest, descriptions: Mapping[str, str | None]) -> Image:
    """The plugin input for one series, with the normalised body parts. Raises ImageLoadError.

    `descriptions`: BodyPartExamined, StudyDescription, SeriesDescription, ProtocolName (any may be None).
    """
    image = load_image(list(paths), min_slices=manifest.series.min_slices)
    parts = normalise_body_part(descriptions.get("BodyPartExamined"), descriptions.get("StudyDescription"),
                                descriptions.get("SeriesDescription"), descriptions.get("ProtocolName"))
    return dataclasses.replace(image, body_parts=parts)


def run_plugin(plugin: Plugin, manifest: Manifest, image: Image) -> Findings:
    """Run and validate. Raises TypeError/ValueError for findings that break the contract, or whatever
    the plugin raises."""
    findings = plugin.run(image)
    if not isinstance(findings, Findings):
        raise TypeError(f"run() returned {type(findings).__name__}, not Findings")
    findings.validate(manifest, image)
    return findings


def merged_warnings(image: Image, findings: Findings) -> list[str]:
    return list(dict.fromkeys([*image.warnings, *findings.warnings]))


def encode_outputs(findings: Findings, image: Image, paths_by_uid: Mapping[str, Path], settings: Settings,
                   manifest: Manifest, source_series_uid: str, out_dir: Path, meta: dict[str, Any],
                   timings: dict[str, float] | None = None) -> list[Path]:
    """SEG/SR/SC and findings.json for one run, with provenance from the settings; `timings` receives
    the seconds per object kind. Raises ValueError/OSError."""
    prov = Provenance(manifest=manifest, manufacturer=settings.manufacturer, model_name=settings.model_name,
                      device_serial_number=settings.device_serial_number, institution_name=settings.institution_name)
    return write_outputs(findings, image, read_sources(image, paths_by_uid), prov, source_series_uid, out_dir, meta,
                         settings.sc_max_images, timings)
