"""Plugin contract: manifest, the image a plugin receives, the Findings it returns, the Plugin class.

This module imports nothing from the rest of radnode (and not torch): the node reads manifests to
validate rules without loading any model; workers import a plugin's `factory` only when they run it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_VERSION = 1
SUPPORTED_API_VERSIONS = frozenset({1})
QUEUES = ("gpu", "cpu")
OUTPUT_KINDS = ("SR", "SEG", "SC")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CONFIG_FILE = "config.json"  # in <models dir>/<plugin>/: overrides keys of the manifest's config
ONNX_FILE = "model.onnx"  # in <models dir>/<plugin>/: the exported model for backend "onnx"


def validation_problems(exc: ValidationError, root: str) -> str:
    """pydantic's errors as one line: `key.sub: message; ...` (`root` names an error on the whole object)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in exc.errors())

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Model):
    """A coded concept (DICOM Code Sequence item): value, scheme designator, meaning."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16, description="e.g. SCT, DCM, UCUM, 99RADNODE")
    meaning: str = Field(min_length=1, max_length=64)


class SegmentSpec(_Model):
    """One segment a plugin can produce: a label (unique in the plugin) and its SNOMED CT codes."""

    label: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code


class SeriesSelection(_Model):
    """The series a plugin suits by default (rules may narrow it, never widen the modality)."""

    body_parts: list[str] = Field(default_factory=list, description="normalised body parts, e.g. CHEST; empty = any")
    min_slices: int = Field(1, ge=1)
    multiple: bool = Field(False, description="takes every series a study-level rule chose, in one run: the first "
                           "is `image`, the others `image.others` (then only study-level rules may route to it)")


class PriorsSpec(_Model):
    """A plugin that compares with earlier exams: radnode finds the patient's earlier studies of the same
    modality in the PACS (RADNODE_PRIORS_SOURCE) and hands them over in `Image.priors`, newest first."""

    within_days: int = Field(730, ge=1, le=36500, description="how far back to look")
    max_studies: int = Field(1, ge=1, le=5)


class Manifest(_Model):
    """What a plugin is, as data. Registered under the entry-point group `radnode.plugins`."""

    name: str
    version: str = Field(min_length=1, max_length=32)
    api_version: int = API_VERSION
    title: str = ""
    factory: str = Field(description='"pkg.module:callable" returning a Plugin; imported only in workers')
    modalities: list[str] = Field(min_length=1)
    outputs: list[Literal["SR", "SEG", "SC"]] = Field(default_factory=lambda: ["SR"])
    segments: list[SegmentSpec] = Field(default_factory=list)
    findings: list[Code] = Field(default_factory=list)
    triage: list[Code] = Field(
        default_factory=list, description="findings whose positive classification is a triage flag: the result "
        "is dispatched first and marked urgent (critical) in FHIR/HL7 results; each must be among `findings`")
    queue: Literal["gpu", "cpu"] = "cpu"
    series: SeriesSelection = Field(default_factory=SeriesSelection)
    weights: str | None = Field(
        None, description="weights file under <models dir>/<name>/ (safetensors, TorchScript, ONNX); None = none"
    )
    reference_only: bool = Field(False, description="a template/test plugin: never routed by default rules")
    priors: PriorsSpec | None = Field(None, description="the patient's earlier studies this plugin compares with")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="architecture and preprocessing as JSON values; <models dir>/<name>/config.json overrides keys",
    )

    def config_in(self, folder: Path | None) -> dict[str, Any]:
        """`config` with the keys of `<folder>/config.json` (the plugin's models folder) replacing it.

        Raises WeightsUnavailable when that file is not a JSON object or names keys `config` lacks."""
        import json

        config = dict(self.config)
        path = folder / CONFIG_FILE if folder is not None else None
        if path is None or not path.is_file():
            return config
        try:
            override = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WeightsUnavailable(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(override, dict):
            raise WeightsUnavailable(f"{path}: must be a JSON object of configuration keys")
        unknown = sorted(set(override) - set(config))
        if unknown:
            known = ", ".join(sorted(config))
            raise WeightsUnavailable(f"{path}: unknown key(s) {', '.join(unknown)} (known: {known})")
        config.update(override)
        return config

    def files(self, folder: Path, config: dict[str, Any] | None = None) -> list[tuple[str, Path]]:
        """(role, path) of every file the plugin needs in its models folder: the weights (model.onnx
        instead with backend "onnx"), then each config value of a key ending in "_file" (e.g. heads_file).
        The first is the model file whose SHA-256 is recorded on jobs."""
        config = self.config if config is None else config
        if config.get("backend") == "onnx":  # the exported model replaces the torch weights
            out = [("onnx", folder / ONNX_FILE)]
        else:
            out = [("weights", folder / self.weights)] if self.weights else []
        out += [(key.removesuffix("_file"), folder / str(value)) for key, value in sorted(config.items())
                if key.endswith("_file") and value]
        return out

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"plugin name must be lower-case letters, digits and '-': {v!r}")
        return v

    @field_validator("api_version")
    @classmethod
    def _api(cls, v: int) -> int:
        if v not in SUPPORTED_API_VERSIONS:
            raise ValueError(f"api_version {v} is not supported (this radnode speaks {sorted(SUPPORTED_API_VERSIONS)})")
        return v

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            raise ValueError(f'factory must look like "package.module:callable", got {v!r}')
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        return [m.strip().upper() for m in v]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | None) -> str | None:
        if v is not None and (Path(v).is_absolute() or ".." in Path(v).parts or not v.strip()):
            raise ValueError(f"weights must be a file name relative to the plugin's models folder, got {v!r}")
        return v

    @model_validator(mode="after")
    def _unique_segments(self) -> Manifest:
        labels = [s.label for s in self.segments]
        if len(labels) != len(set(labels)):
            raise ValueError("segment labels must be unique")
        known = {(c.value, c.scheme) for c in self.findings}
        stray = [c.meaning for c in self.triage if (c.value, c.scheme) not in known]
        if stray:
            raise ValueError(f"triage flags must be among the findings: {', '.join(stray)}")
        return self

    def is_triage(self, concept: Code) -> bool:
        """True when a positive classification of `concept` is a triage flag."""
        return any((c.value, c.scheme) == (concept.value, concept.scheme) for c in self.triage)


# --- what the core hands a plugin ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRef:
    """The stored instance (and frame, for multi-frame) one slice/image/frame came from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class Image:
    """Pixels + geometry built by the core from stored instances.

    - kind "volume" (CT): `pixels` float32 (z, y, x) in HU, slices sorted by position along the
      slice normal; `spacing` (z, y, x) in mm; `origin` = ImagePositionPatient of slice 0;
      `direction` = (row cosines, column cosines, slice normal); one `sources` entry per slice.
    - kind "image2d" (CR/DX/SC): `pixels` float32 (y, x), Modality and VOI LUT applied and
      MONOCHROME1 inverted (high = bright); `spacing` (y, x) in mm when known; one source.
    - kind "frames" (US): `pixels` (n, y, x) grey or (n, y, x, 3) RGB uint8; one source per frame.

    `warnings` are the loader's series quality checks; `attrs` are non-identifying header values
    (Modality, Manufacturer, SliceThickness, ConvolutionKernel, ...). No patient data.
    """

    kind: Literal["volume", "image2d", "frames"]
    pixels: np.ndarray
    spacing: tuple[float, ...]
    sources: tuple[SourceRef, ...]
    modality: str
    origin: tuple[float, float, float] | None = None
    direction: tuple[tuple[float, float, float], ...] | None = None
    body_parts: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    priors: tuple[Prior, ...] = ()  # earlier studies, newest first (only for a manifest that asks: `priors`)
    others: tuple[Image, ...] = ()  # the study's other chosen series (only for `series.multiple`)


@dataclass(frozen=True)
class Prior:
    """An earlier study of the same patient: its series loaded like the current one, and when it was made."""

    study_uid: str
    study_date: str | None  # YYYY-MM-DD
    days_before: int | None
    image: Image


# --- what a plugin returns -----------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """A finding's probability; positive when probability >= threshold."""

    concept: Code
    probability: float
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not (0.0 <= self.probability <= 1.0) or not (0.0 <= self.threshold <= 1.0):
            raise ValueError(f"{self.concept.meaning}: probability and threshold must be in [0, 1]")

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Segmentation:
    """A binary mask aligned with `Image.pixels` (same leading shape) for one declared segment."""

    segment: str
    mask: np.ndarray


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement with its UCUM unit, optionally about one segment and one frame/slice
    (`frame`: an index into `Image.sources`, e.g. an ultrasound frame's area)."""

    concept: Code
    value: float
    unit: str
    segment: str | None = None
    frame: int | None = None


@dataclass(frozen=True)
class Heatmap:
    """A float map in [0, 1] aligned with `Image.pixels` (spatial shape). `quantity` says what the values
    measure (shown on the colour bar, e.g. "probability of prostate"); `unit` is "1" (values 0-1 shown as
    they are) or "%" (a fraction, shown as 0-100 %)."""

    name: str
    values: np.ndarray
    quantity: str = "relative saliency"
    unit: Literal["1", "%"] = "1"


@dataclass
class Findings:
    """Everything one plugin run found, or why it does not apply."""

    classifications: list[Classification] = field(default_factory=list)
    segmentations: list[Segmentation] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: str = ""
    not_applicable: str | None = None

    @classmethod
    def not_applicable_because(cls, reason: str) -> Findings:
        return cls(not_applicable=reason, summary=f"not applicable: {reason}")

    def validate(self, manifest: Manifest, image: Image) -> None:
        """Check the findings against the manifest and the image. Raises ValueError."""
        labels = {s.label for s in manifest.segments}
        spatial = image.pixels.shape[:2] if image.kind == "image2d" else image.pixels.shape[:3]
        for seg in self.segmentations:
            if seg.segment not in labels:
                raise ValueError(f"segment {seg.segment!r} is not declared in the manifest")
            if seg.mask.shape != spatial:
                raise ValueError(f"mask for {seg.segment!r} has shape {seg.mask.shape}, image has {spatial}")
        for m in self.measurements:
            if m.segment is not None and m.segment not in labels:
                raise ValueError(f"measurement refers to undeclared segment {m.segment!r}")
            if m.frame is not None and not 0 <= m.frame < len(image.sources):
                raise ValueError(f"measurement {m.concept.meaning} refers to frame {m.frame}; the image has "
                                 f"{len(image.sources)}")
            if not np.isfinite(m.value):
                raise ValueError(f"measurement {m.concept.meaning} is not a finite number")
        for h in self.heatmaps:
            if h.values.shape != spatial:
                raise ValueError(f"heatmap {h.name!r} has shape {h.values.shape}, image has {spatial}")
            if h.unit not in ("1", "%") or not h.quantity.strip():
                raise ValueError(f"heatmap {h.name!r} needs a quantity and the unit \"1\" or \"%\", got "
                                 f"{h.quantity!r} in {h.unit!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (no arrays: masks and heatmaps are described by size)."""
        return {
            "not_applicable": self.not_applicable,
            "summary": self.summary,
            "warnings": list(self.warnings),
            "classifications": [
                {
                    "concept": c.concept.model_dump(),
                    "probability": c.probability,
                    "threshold": c.threshold,
                    "positive": c.positive,
                }
                for c in self.classifications
            ],
            "measurements": [
                {"concept": m.concept.model_dump(), "value": m.value, "unit": m.unit, "segment": m.segment,
                 "frame": m.frame}
                for m in self.measurements
            ],
            "segmentations": [
                {"segment": s.segment, "voxels": int(np.count_nonzero(s.mask))} for s in self.segmentations
            ],
            "heatmaps": [
                {"name": h.name, "max": float(np.max(h.values)) if h.values.size else 0.0, "quantity": h.quantity,
                 "unit": h.unit}
                for h in self.heatmaps
            ],
        }


class WeightsUnavailable(RuntimeError):
    """The plugin's weights file is missing or unreadable: the plugin is unavailable, jobs are skipped."""


class NotApplicable(Exception):
    """The image does not suit the plugin: the message says why. Raised inside a plugin's own steps; its `run`
    returns `Findings.not_applicable_because(str(exc))`."""


# --- what the optional capabilities return ------------------------------------------------------------------


class Embeddings(Protocol):
    """What `Plugin.embed_studies` returns: per array one row for each id in `ids`, why the other items have
    none (`failed`: the caller may add items it could not hand over), and `write`, which writes all of it as the
    plugin's embeddings file to a binary file (the caller picks the path and writes it atomically)."""

    ids: list[str]
    arrays: dict[str, np.ndarray]
    failed: dict[str, str]

    def write(self, file: BinaryIO) -> None:
        """Write the embeddings file. Raises ValueError when the arrays do not fit the ids, OSError."""
        ...


@dataclass(frozen=True)
class TrainedHeads:
    """What `Plugin.train_heads` returns: the training report (JSON-able) and the heads file's content, which
    the caller writes (atomically) where it wants."""

    report: dict[str, Any]
    content: bytes


class Plugin(ABC):
    """One model = one call. Built by the manifest's factory, loaded once per worker process.

    Besides `load` and `run`, a plugin may offer capabilities the CLI's model tools use without naming it:
    `export_onnx` (`radnode export-onnx`), `load_embedder` + `embed_studies` (`radnode embed`), `train_heads`
    (`radnode train-head`). The defaults raise NotImplementedError saying the plugin cannot."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    @abstractmethod
    def load(self, device: str, weights: Path | None) -> None:
        """Load the model onto `device` ("cpu", "cuda", "cuda:1") from `weights` (None when the
        manifest declares none). Raises WeightsUnavailable when the file cannot be used."""

    @abstractmethod
    def run(self, image: Image) -> Findings:
        """Run on one series. Return `Findings.not_applicable_because(reason)` when the series does
        not suit the model; raise on a genuine failure (the job is failed with the reason)."""

    # --- optional capabilities ----------------------------------------------------------------------------

    def export_onnx(self, path: Path) -> dict[str, Any]:
        """Export the loaded model to ONNX at `path` and check it against torch on a sample input.

        Returns a report with at least "max_abs_diff". Plugins without an ONNX path raise
        NotImplementedError (the default)."""
        raise NotImplementedError(f"plugin {self.manifest.name} has no ONNX export")

    def load_embedder(self, device: str, weights: Path | None) -> None:
        """Load what `embed_studies` needs onto `device` (e.g. a backbone without its heads). Raises
        WeightsUnavailable; NotImplementedError (the default) for a plugin that cannot embed."""
        raise NotImplementedError(f"plugin {self.manifest.name} cannot embed")

    def embed_studies(self, items: Sequence[tuple[str, Sequence[Path]]], load: Callable[[Sequence[Path]], Image],
                      *, batch_size: int = 8, patches: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> Embeddings:
        """Embed each item (an id and the files of its one image, read by `load`, the node's image loader) in
        batches of `batch_size`; `patches` also keeps every patch token; `progress(done, total)` after each
        item. An item that cannot be loaded or does not suit the model is recorded in `failed`. Raises
        ValueError (repeated ids, batch_size < 1), RuntimeError (not loaded by `load_embedder`);
        NotImplementedError (the default) for a plugin that cannot embed."""
        raise NotImplementedError(f"plugin {self.manifest.name} cannot embed")

    def train_heads(self, embeddings: Path, labels: Path, *, seed: int = 0, val_fraction: float = 0.2,
                    epochs: int = 100, hidden: int = 0) -> TrainedHeads:
        """Train the plugin's heads on an embeddings file (written from `embed_studies`) and a labels CSV.
        Raises ValueError (bad labels, embeddings or training data), OSError; NotImplementedError (the
        default) for a plugin without trainable heads."""
        raise NotImplementedError(f"plugin {self.manifest.name} cannot train heads")
