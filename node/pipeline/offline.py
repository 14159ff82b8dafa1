"""Offline inference (`radnode infer`): a folder, a zip of DICOM files or one file -> the same SEG/SR/SC and
findings.json a job writes, without the node, the job table or a broker."""

from __future__ import annotations

import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.dicom.files import ZipTooLarge, iter_dicom_files, zip_members
from node.imaging import ImageLoadError
from node.pipeline.inference import encode_outputs, load_series_image, merged_warnings, run_plugin
from node.settings import Settings
from plugins.base import Findings, Manifest, Plugin


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
    """Load, run, encode one series. Never raises for bad input or a failing plugin: the run says why."""
    run = SeriesRun(series_uid, descriptions.get("Modality") or "?", len(files))
    if run.modality.upper() not in manifest.modalities:
        run.state, run.reason = "not-applicable", f"modality {run.modality} not in {', '.join(manifest.modalities)}"
        return run
    t = time.perf_counter()
    step("loading the image")
    try:
        image = load_series_image(files, manifest, descriptions)
    except ImageLoadError as exc:
        run.state, run.reason = "failed", f"image load: {exc}"
        return run
    run.timings["image_load"] = round(time.perf_counter() - t, 3)
    step("running the model")
    t = time.perf_counter()
    try:
        findings: Findings = run_plugin(plugin, manifest, image)
    except Exception as exc:
        run.state, run.reason, run.warnings = "failed", f"{type(exc).__name__}: {exc}", list(image.warnings)
        return run
    run.timings["infer"] = round(time.perf_counter() - t, 3)
    run.warnings, run.findings = merged_warnings(image, findings), findings.to_json()
    if findings.not_applicable:
        run.state, run.reason = "not-applicable", findings.not_applicable
        return run
    step("writing SEG/SR/SC")
    t = time.perf_counter()
    by_uid = {}
    for f in files:
        by_uid[str(dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)] = f
    meta = {"plugin": manifest.name, "plugin_version": manifest.version, "weights_sha256": weights_sha,
            "source_instances": len(image.sources), "series_uid": series_uid}
    try:
        outputs = encode_outputs(findings, image, by_uid, settings, manifest, series_uid, out_dir, meta)
    except Exception as exc:
        run.state, run.reason = "failed", f"encode: {type(exc).__name__}: {exc}"
        return run
    run.timings["encode"] = round(time.perf_counter() - t, 3)
    run.state, run.outputs = "encoded", [str(p) for p in outputs]
    return run
