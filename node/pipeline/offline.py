"""Offline inference (`radnode infer`): a folder, a zip of DICOM files or one file -> the same SEG/SR/SC and
findings.json a job writes, without the node, the job table or a broker."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.dicom.files import ZipTooLarge, iter_dicom_files, zip_members
from node.pipeline.run import run_series
from node.settings import Settings
from plugins.base import Manifest, Plugin


class InferError(RuntimeError):
    """The input cannot be used (no DICOM files, a bad zip); the message says why."""


@dataclass
class SeriesRun:
    """One series through the plugin: its outputs, or why there are none."""

    series_uid: str
    modality: str
    files: int
    state: str = "pending"  # encoded | not-applicable | failed
    reason: str | None = None
    findings: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid, "modality": self.modality, "files": self.files, "state": self.state,
            "reason": self.reason, "warnings": self.warnings, "findings": self.findings, "outputs": self.outputs,
            "timings": self.timings,
        }


@contextmanager
def input_files(path: Path) -> Iterator[list[Path]]:
    """The candidate files of PATH: a folder (recursively), a zip (extracted to a temporary folder) or
    one file. Raises InferError."""
    if not path.exists():
        raise InferError(f"{path}: no such file or folder")
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="radnode-infer-") as tmp:
            try:
                with zipfile.ZipFile(path) as archive:
                    for m in zip_members(archive):
                        archive.extract(m, tmp)  # extract() keeps members inside tmp (no '..' escape)
            except ZipTooLarge as exc:
                raise InferError(f"{path}: {exc}") from None
            except zipfile.BadZipFile as exc:
                raise InferError(f"{path}: not a readable zip ({exc})") from None
            yield list(iter_dicom_files([Path(tmp)]))
        return
    yield list(iter_dicom_files([path]))


def infer_series(plugin: Plugin, manifest: Manifest, settings: Settings, files: list[Path],
                 descriptions: dict[str, str | None], series_uid: str, out_dir: Path, weights_sha: str | None,
                 step: Callable[[str], None] = lambda _: None) -> SeriesRun:
    """Load, run, encode one series (`run_series`). Never raises for bad input or a failing plugin: the
    run says why."""
    run = SeriesRun(series_uid, descriptions.get("Modality") or "?", len(files))
    if run.modality.upper() not in manifest.modalities:
        run.state, run.reason = "not-applicable", f"modality {run.modality} not in {', '.join(manifest.modalities)}"
        return run
    result = run_series(plugin, manifest, settings, files, descriptions, series_uid, out_dir, weights_sha,
                        meta={"series_uid": series_uid}, step=step)
    run.state, run.reason = result.state, result.reason
    if result.failed_at == "encode":
        run.reason = f"encode: {result.reason}"
    run.findings = result.findings.to_json() if result.findings is not None else None
    run.warnings, run.outputs, run.timings = result.warnings, [str(p) for p in result.outputs], result.timings
    return run
