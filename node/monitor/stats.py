"""Monitoring, statistics: per job observations (inputs and outputs), weekly aggregates per plugin x scanner, and
agreement, sensitivity and specificity from the radiologists' feedback.

Feedback counts as labels this way (the latest verdict of each reader on each target of a job counts; the
history keeps the earlier ones): on a finding the model called positive, "agree" is a true positive and
"disagree" a false positive; on a negative finding "agree" is a true negative and "disagree" a false negative.
Agreement is the share of verdicts that agree (agree, accept) among all (agree, disagree, accept, reject,
edited): an "edited" segment needed a correction, so it counts against agreement.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import datetime
from statistics import fmean
from typing import Any

AGREEING = {"agree", "accept"}
UNKNOWN = "unknown"


def iso_week(moment: datetime) -> str:
    """`2026-W49`: the ISO year and week of a moment."""
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def finding_name(concept: dict[str, Any]) -> str:
    return f"{concept['scheme']}:{concept['value']}"


def observations(row: dict[str, Any]) -> dict[str, Any]:
    """What one job contributes to the statistics: `categories` (kernel, model, station, positive:<finding>),
    `values` (slice_thickness, pixel_spacing, intensity_mean, intensity_std, probability:<finding>,
    measurement:<finding>[/segment]) and `histogram` ((edges, proportions) or None)."""
    s = row.get("input_stats") or {}
    f = row.get("findings") or {}
    categories = {k: str(s.get(k) or UNKNOWN) for k in ("kernel", "model", "station")} if s else {}
    intensity = s.get("intensity") or {}
    spacing = s.get("pixel_spacing") or [None]
    values: dict[str, float | None] = {"slice_thickness": _num(s.get("slice_thickness")),
                                       "pixel_spacing": _num(spacing[0]),
                                       "intensity_mean": _num(intensity.get("mean")),
                                       "intensity_std": _num(intensity.get("std"))}
    for c in f.get("classifications") or []:
        name = finding_name(c["concept"])
        values[f"probability:{name}"] = _num(c["probability"])
        categories[f"positive:{name}"] = "positive" if c["positive"] else "negative"
    for m in f.get("measurements") or []:
        values[f"measurement:{finding_name(m['concept'])}" + (f"/{m['segment']}" if m.get("segment") else "")] = \
            _num(m["value"])
    histogram = None
    h = s.get("histogram") or {}
    counts = [float(c) for c in h.get("counts") or []]
    if counts and sum(counts) > 0 and len(h.get("edges") or []) == len(counts) + 1:
        total = sum(counts)
        histogram = (tuple(float(e) for e in h["edges"]), [c / total for c in counts])
    return {"categories": categories, "values": {k: v for k, v in values.items() if v is not None},
            "histogram": histogram}


def labelled(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(job row, verdict) for the latest verdict of each reader on each target of each job."""
    out = []
    for row in rows:
        latest = {(v["reader"], v["target_kind"], v["target"]): v for v in row["feedback"]}
        out.extend((row, v) for v in latest.values())
    return out


def confusion(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target (`result`, a finding `SCH:code`, `segment:<label>`): verdicts, agreement and, for findings,
    TP/FP/TN/FN with sensitivity and specificity (None where the labels do not allow them)."""
    table: dict[str, Counter] = defaultdict(Counter)
    meaning: dict[str, str] = {}
    for row, v in labelled(rows):
        key = {"result": "result", "finding": v["target"], "segment": f"segment:{v['target']}"}[v["target_kind"]]
        t = table[key]
        t["n"] += 1
        t["agree"] += v["verdict"] in AGREEING
        if v["target_kind"] == "finding":
            for c in (row["findings"] or {}).get("classifications") or []:
                if finding_name(c["concept"]) == v["target"]:
                    meaning[key] = c["concept"]["meaning"]
                    t[("tp" if c["positive"] else "tn") if v["verdict"] == "agree" else
                      ("fp" if c["positive"] else "fn")] += 1
    out = {}
    for key, t in sorted(table.items()):
        tp, fp, tn, fn = t["tp"], t["fp"], t["tn"], t["fn"]
        out[key] = {"meaning": meaning.get(key, key), "verdicts": t["n"], "agreement": t["agree"] / t["n"],
                    "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                    "sensitivity": tp / (tp + fn) if tp + fn else None,
                    "specificity": tn / (tn + fp) if tn + fp else None}
    return out


def weekly(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per plugin x scanner model x station x ISO week (sorted): series count, input statistics (slice
    thickness, kernels, pixel spacing, intensity), outputs (positive rate and mean probability per finding, mean
    of each measurement) and the feedback in that week (agreement, sensitivity, specificity per finding)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        s = row.get("input_stats") or {}
        groups[(row["plugin"], str(s.get("model") or UNKNOWN), str(s.get("station") or UNKNOWN),
                iso_week(row["created_at"]))].append(row)
    out = []
    for (plugin, model, station, week), members in sorted(groups.items()):
        obs = [observations(r) for r in members]

        def mean_of(name: str, where: list[dict[str, Any]] = obs) -> float | None:
            xs = [o["values"][name] for o in where if name in o["values"]]
            return fmean(xs) if xs else None

        names = sorted({k for o in obs for k in o["values"]})
        findings = sorted({k.split(":", 1)[1] for k in names if k.startswith("probability:")})
        out.append({
            "plugin": plugin, "model": model, "station": station, "week": week, "series": len(members),
            "slice_thickness": mean_of("slice_thickness"), "pixel_spacing": mean_of("pixel_spacing"),
            "intensity_mean": mean_of("intensity_mean"), "intensity_std": mean_of("intensity_std"),
            "kernels": dict(Counter(o["categories"].get("kernel", UNKNOWN) for o in obs).most_common()),
            "positive_rate": {f: fmean(o["categories"][f"positive:{f}"] == "positive" for o in obs
                                       if f"positive:{f}" in o["categories"]) for f in findings},
            "probability_mean": {f: mean_of(f"probability:{f}") for f in findings},
            "measurements": {k.split(":", 1)[1]: mean_of(k) for k in names if k.startswith("measurement:")},
            "feedback": confusion(members),
        })
    return out
