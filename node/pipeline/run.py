"""Infer and encode steps: one series through a loaded plugin (image load -> run -> SEG/SR/SC), the one path
shared by the Celery worker, offline `radnode infer` and `radnode evaluate`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom import dcmread

from node.dicom.bodypart import normalise_body_part
from node.imaging import ImageLoadError, load_image
from node.results.common import ObjectRef, Provenance
from node.results.outputs import object_refs, read_sources, write_outputs
from node.settings import Settings
from plugins.base import Findings, Image, Manifest, Plugin, Prior

State = Literal["inferred", "encoded", "not-applicable", "failed"]
Step = Literal["image", "model", "encode"]


def _quiet(_: str) -> None:
    pass


@dataclass
class SeriesResult:
    """What one series came to.

    `state`: "inferred" (run_model: the plugin ran, nothing written), "encoded" (run_series: objects
    written), "not-applicable" (the plugin's reason in `reason`) or "failed" (`failed_at` says where:
    "image", "model" or "encode"; `reason` what went wrong; `error` the exception when it was an
    unexpected one, worth a traceback, and None for an image the loader refused).
    `timings`: seconds for image_load, infer, encode (the steps that finished); `encode_parts`: seconds
    per object kind written.
    """

    state: State
    reason: str | None = None
    failed_at: Step | None = None
    error: Exception | None = None
    image: Image | None = None
    findings: Findings | None = None
    warnings: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    objects: list[ObjectRef] = field(default_factory=list)  # the DICOM objects among the outputs
    timings: dict[str, float] = field(default_factory=dict)
    encode_parts: dict[str, float] = field(default_factory=dict)

    def _failed(self, at: Step, exc: Exception) -> SeriesResult:
        self.state, self.failed_at, self.error, self.reason = "failed", at, exc, f"{type(exc).__name__}: {exc}"
        return self


def run_model(plugin: Plugin, manifest: Manifest, files: Sequence[Path], descriptions: Mapping[str, str | None],
              step: Callable[[str], None] = _quiet, priors: Sequence[Prior] = (),
              others: Sequence[tuple[Sequence[Path], Mapping[str, str | None]]] = ()) -> SeriesResult:
    """Load the series image and run the plugin on it (state inferred, not-applicable or failed).

    `descriptions`: BodyPartExamined, StudyDescription, SeriesDescription, ProtocolName (any may be None),
    from which the image's body parts are normalised. `step` is told what starts. `priors` (earlier
    studies, for a manifest that asks) ride along in `Image.priors`; `others` (files and descriptions of the
    study's other chosen series, for a plugin taking several) are loaded into `Image.others`. Never raises for
    bad input or a failing plugin: the result says why.
    """
    step("loading the image")
    t = time.perf_counter()
    try:
        image = dataclasses.replace(
            _load_series_image(files, manifest, descriptions), priors=tuple(priors),
            others=tuple(_load_series_image(f, manifest, d) for f, d in others))
    except ImageLoadError as exc:
        return SeriesResult("failed", f"image load: {exc}", "image")
    except Exception as exc:
        return SeriesResult("failed", f"image load: {type(exc).__name__}: {exc}", "image", exc)
    result = SeriesResult("inferred", image=image, timings={"image_load": round(time.perf_counter() - t, 3)})
    step("running the model")
    t = time.perf_counter()
    try:
        findings = _run_plugin(plugin, manifest, image)
    except Exception as exc:
        result.warnings = list(image.warnings)
        return result._failed("model", exc)
    result.timings["infer"] = round(time.perf_counter() - t, 3)
    result.findings, result.warnings = findings, list(dict.fromkeys([*image.warnings, *findings.warnings]))
    if findings.not_applicable:
        result.state, result.reason = "not-applicable", findings.not_applicable
    return result


def run_series(plugin: Plugin, manifest: Manifest, settings: Settings, files: Sequence[Path],
               descriptions: Mapping[str, str | None], series_uid: str, out_dir: Path, weights_sha: str | None, *,
               meta: Mapping[str, Any] | None = None, paths_by_uid: Mapping[str, Path] | None = None,
               step: Callable[[str], None] = _quiet, revision: int = 0,
               predecessors: Sequence[ObjectRef] = (), priors: Sequence[Prior] = (),
               others: Sequence[tuple[Sequence[Path], Mapping[str, str | None]]] = (),
               on_findings: Callable[[Findings], None] | None = None) -> SeriesResult:
    """Load, run and encode one series: SEG/SR/SC and findings.json in `out_dir` (state encoded,
    not-applicable or failed), with provenance from the settings.

    `meta` leads findings.json's run description (plugin, version, weights SHA-256, source instances);
    `paths_by_uid` maps SOP Instance UIDs to `files` (read from the headers when not given). `revision` > 0
    makes new UIDs for a series that changed after its earlier results, and the SR names `predecessors`
    (the earlier SR) in its Predecessor Documents Sequence. `on_findings` is called with the findings before
    encoding starts (a triage flag is sent from there). Never raises for bad input, a failing plugin or an
    encoder error: the result says why (`on_findings` must not raise either).
    """
    result = run_model(plugin, manifest, files, descriptions, step, priors, others)
    if result.state != "inferred":
        return result
    assert result.image is not None and result.findings is not None
    if on_findings is not None:
        on_findings(result.findings)
    step("writing SEG/SR/SC")
    t = time.perf_counter()
    try:
        if paths_by_uid is None:
            paths_by_uid = {str(dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID): f
                            for f in files}
        document = {**(meta or {}), "plugin": manifest.name, "plugin_version": manifest.version,
                    "weights_sha256": weights_sha, "source_instances": len(result.image.sources)}
        prov = Provenance(manifest=manifest, manufacturer=settings.manufacturer, model_name=settings.model_name,
                          device_serial_number=settings.device_serial_number,
                          institution_name=settings.institution_name, revision=revision,
                          predecessors=tuple(predecessors))
        outputs = write_outputs(result.findings, result.image, read_sources(result.image, paths_by_uid), prov,
                                series_uid, out_dir, document, settings.sc_max_images, result.encode_parts)
        result.objects = object_refs(outputs)
    except Exception as exc:
        return result._failed("encode", exc)
    result.timings["encode"] = round(time.perf_counter() - t, 3)
    result.state, result.outputs = "encoded", list(outputs)
    return result


def _load_series_image(paths: Sequence[Path], manifest: Manifest, descriptions: Mapping[str, str | None]) -> Image:
    """The plugin input for one series, with the normalised body parts. Raises ImageLoadError."""
    image = load_image(list(paths), min_slices=manifest.series.min_slices)
    parts = normalise_body_part(descriptions.get("BodyPartExamined"), descriptions.get("StudyDescription"),
                                descriptions.get("SeriesDescription"), descriptions.get("ProtocolName"))
    return dataclasses.replace(image, body_parts=parts)


def _run_plugin(plugin: Plugin, manifest: Manifest, image: Image) -> Findings:
    """Run and validate. Raises TypeError/ValueError for findings that break the contract, or whatever
    the plugin raises."""
    findings = plugin.run(image)
    if not isinstance(findings, Findings):
        raise TypeError(f"run() returned {type(findings).__name__}, not Findings")
    findings.validate(manifest, image)
    return findings
