"""Encode step, shared: our provenance on every output object and deterministic output UIDs."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

from node import __version__
from plugins.base import Manifest

KINDS = ("SR", "SEG", "SC")


def derive_uid(source_series_uid: str, plugin: str, plugin_version: str, kind: str, index: int | str) -> str:
    """A UID fixed by (source series, plugin, version, object kind, index): a re-run reproduces it.

    Form 2.25.<128-bit integer> (ITU-T X.667 / DICOM PS3.5 B.2), from SHA-256 of the inputs.
    """
    key = "\x1f".join([source_series_uid, plugin, plugin_version, kind, str(index)]).encode()
    return "2.25." + str(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


def series_number(plugin: str, kind: str) -> int:
    """A stable SeriesNumber per (plugin, kind) in 9000-9999, never random."""
    return 9000 + (zlib.crc32(plugin.encode()) % 300) * 3 + KINDS.index(kind)


@dataclass(frozen=True)
class Provenance:
    """Who made an output object: radnode (settings) + the plugin (manifest)."""

    manifest: Manifest
    manufacturer: str = "radnode"
    model_name: str = "radnode AI node"
    device_serial_number: str = "RADNODE"
    institution_name: str | None = None

    @property
    def software_versions(self) -> str:
        return f"radnode {__version__}; {self.manifest.name} {self.manifest.version}"

    def series_description(self, kind: str) -> str:
        """SeriesDescription of an output series: says it is AI-generated and by which model (<= 64 chars)."""
        return f"AI-generated {kind} - {self.manifest.name} {self.manifest.version}"[:64]

    def uid(self, source_series_uid: str, kind: str, index: int | str) -> str:
        return derive_uid(source_series_uid, self.manifest.name, self.manifest.version, kind, index)
