"""Plugin registry: discovery through the `radnode.plugins` entry points, availability, building."""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import ValidationError

from plugins.base import Manifest, Plugin, WeightsUnavailable, validation_problems

ENTRY_POINT_GROUP = "radnode.plugins"
log = logging.getLogger("radnode.plugins")


class PluginLoadError(RuntimeError):
    """A plugin's factory could not be imported or did not build a Plugin."""


@dataclass
class Discovery:
    """Manifests found, and per-plugin errors (a broken plugin is excluded, never fatal)."""

    manifests: dict[str, Manifest] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def discover() -> Discovery:
    """Read every manifest registered under `radnode.plugins`. Never raises for a bad plugin."""
    found = Discovery()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            manifest = obj if isinstance(obj, Manifest) else Manifest.model_validate(obj)
        except ValidationError as exc:
            found.errors[ep.name] = f"invalid manifest: {validation_problems(exc, 'manifest')}"
        except Exception as exc:  # a third-party package may fail in any way on import
            found.errors[ep.name] = f"cannot load {ep.value}: {type(exc).__name__}: {exc}"
            log.error("plugin %s excluded: %s", ep.name, found.errors[ep.name], exc_info=True)
            continue
        else:
            if manifest.name != ep.name:
                found.errors[ep.name] = f"manifest name {manifest.name!r} differs from its entry point {ep.name!r}"
            elif ep.name in found.manifests:
                found.errors[ep.name] = f"registered twice (second: {ep.value})"
            else:
                found.manifests[ep.name] = manifest
                continue
        log.error("plugin %s excluded: %s", ep.name, found.errors[ep.name])
    return found


def weights_path(manifest: Manifest, models_path: Path) -> Path | None:
    """Where the plugin's weights file must be (None when it declares none)."""
    return models_path / manifest.name / manifest.weights if manifest.weights else None


def unavailable_reason(manifest: Manifest, models_path: Path) -> str | None:
    """Why the plugin cannot run here (a file it needs is missing, its config.json is bad), or None."""
    folder = models_path / manifest.name
    try:
        config = manifest.config_in(folder)
    except WeightsUnavailable as exc:
        return f"model unavailable: {exc}"
    for role, path in manifest.files(folder, config):
        if not path.is_file():
            return f"model unavailable: {role} file {path} not found"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex. Raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build(manifest: Manifest) -> Plugin:
    """Import the manifest's factory and build the plugin (not loaded yet). Raises PluginLoadError."""
    module_name, _, attr = manifest.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        plugin = factory(manifest)
    except Exception as exc:
        raise PluginLoadError(f"plugin {manifest.name}: factory {manifest.factory} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(plugin, Plugin):
        raise PluginLoadError(f"plugin {manifest.name}: factory {manifest.factory} returned "
                              f"{type(plugin).__name__}, not a Plugin")
    return plugin
