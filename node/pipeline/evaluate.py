"""`radnode evaluate`: a classification plugin's accuracy on a labelled set of local studies.

PATH holds one case per entry: a sub-folder (all its DICOM files) or a single DICOM file; a case's id is
the entry's name (a file's name without its extension). labels.csv has a header with `id` and `label`
columns; the label is 1/0, true/false, positive/negative, or one of the plugin's class names (its
`classes` config: the first is negative, the last positive, e.g. NORMAL / PNEUMONIA).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.dicom.files import group_series, iter_dicom_files
from node.pipeline.run import run_model
from plugins import metrics
from plugins.base import Manifest, Plugin

POSITIVE = {"1", "true", "yes", "positive", "pos", "abnormal"}
NEGATIVE = {"0", "false", "no", "negative", "neg", "normal"}


class EvaluateError(ValueError):
    """The labels or the cases cannot be used (the message says which line or case)."""


@dataclass
class Metrics:
    tp: int
    fp: int
    tn: int
    fn: int
    auroc: float | None

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else math.nan

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r and not math.isnan(p + r) else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn, "accuracy": self.accuracy,
                "precision": self.precision, "recall": self.recall, "f1": self.f1, "auroc": self.auroc}


@dataclass
class Evaluation:
    finding: str
    metrics: Metrics
    cases: list[dict[str, Any]] = field(default_factory=list)  # id, label, probability, predicted, error


def read_labels(path: Path, negative: Sequence[str] = (), positive: Sequence[str] = ()) -> dict[str, int]:
    """id -> 0/1 from a CSV with `id` and `label` columns. A label is 1/0, true/false, positive/negative,
    or one of the class names given (e.g. NORMAL / PNEUMONIA). Raises EvaluateError naming the line."""
    pos = POSITIVE | {p.lower() for p in positive}
    neg = NEGATIVE | {n.lower() for n in negative}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"id", "label"} <= {c.strip() for c in reader.fieldnames}:
                raise EvaluateError(f"{path}: the header must name the columns id and label")
            labels: dict[str, int] = {}
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                case, value = row["id"], row["label"]
                if not case:
                    raise EvaluateError(f"{path} line {line}: empty id")
                if case in labels:
                    raise EvaluateError(f"{path} line {line}: id {case!r} appears twice")
                if value.lower() in pos:
                    labels[case] = 1
                elif value.lower() in neg:
                    labels[case] = 0
                else:
                    names = ", ".join([*negative, *positive]) or "none"
                    raise EvaluateError(f"{path} line {line}: label {value!r} is not 0/1, true/false or a class "
                                        f"name ({names})")
    except OSError as exc:
        raise EvaluateError(f"{path}: {exc.strerror}") from None
    if not labels:
        raise EvaluateError(f"{path}: no labelled cases")
    return labels


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    try:
        return metrics.auroc(np.asarray(labels), np.asarray(scores))
    except ValueError:
        return None


def cases_in(root: Path) -> dict[str, Path]:
    """Case id -> folder or file, for every entry directly under `root` (hidden entries skipped)."""
    if not root.is_dir():
        raise EvaluateError(f"{root}: not a folder of cases")
    out = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        out[entry.stem if entry.is_file() else entry.name] = entry
    return out


def evaluate(plugin: Plugin, manifest: Manifest, root: Path, labels: dict[str, int], finding: str | None = None,
             progress: Callable[[str], None] = lambda _: None) -> Evaluation:
    """Run the plugin on every labelled case and compare its classification with the label.

    A case that cannot be read or that the plugin does not apply to is listed with its error and left
    out of the metrics. Raises EvaluateError when labels name cases PATH lacks.
    """
    cases = cases_in(root)
    missing = sorted(set(labels) - set(cases))
    if missing:
        raise EvaluateError(f"{len(missing)} labelled case(s) not found under {root}: {', '.join(missing[:5])}")
    wanted = finding or (manifest.findings[0].value if manifest.findings else None)
    rows: list[dict[str, Any]] = []
    for case, label in labels.items():
        progress(case)
        row: dict[str, Any] = {"id": case, "label": label, "probability": None, "predicted": None, "error": None}
        rows.append(row)
        series, info, _ = group_series(list(iter_dicom_files([cases[case]])))
        if len(series) != 1:
            row["error"] = f"{len(series)} series (a case must hold exactly one)"
            continue
        (uid, files), = series.items()
        result = run_model(plugin, manifest, files, info[uid])
        if result.error is not None:
            raise result.error  # a plugin that crashes (or a loader bug) stops the evaluation
        if result.state != "inferred":  # an image the loader refused, or not applicable
            row["error"] = result.reason if result.state == "failed" else f"not applicable: {result.reason}"
            continue
        assert result.findings is not None
        match = [c for c in result.findings.classifications if wanted is None or c.concept.value == wanted]
        if not match:
            row["error"] = f"no classification {wanted}"
            continue
        row["probability"], row["predicted"] = match[0].probability, int(match[0].positive)
    scored = [r for r in rows if r["predicted"] is not None]
    tp = sum(1 for r in scored if r["label"] == 1 and r["predicted"] == 1)
    fp = sum(1 for r in scored if r["label"] == 0 and r["predicted"] == 1)
    tn = sum(1 for r in scored if r["label"] == 0 and r["predicted"] == 0)
    fn = sum(1 for r in scored if r["label"] == 1 and r["predicted"] == 0)
    area = auroc([r["label"] for r in scored], [r["probability"] for r in scored])
    name = next((c.meaning for c in manifest.findings if c.value == wanted), wanted or "?")
    return Evaluation(name, Metrics(tp, fp, tn, fn, area), rows)
