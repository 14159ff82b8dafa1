"""Monitoring step: model and input drift per plugin (last window against a reference window), weekly input and
output statistics per scanner, agreement with the radiologists' feedback, and the feedback export.

`report` is what GET /v1/monitoring and the dashboard's monitoring page show; `gauges` what /metrics exports;
`export_text` what GET /v1/feedback/export and `radnode feedback export` write."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db.feedback import export_rows, monitoring_rows
from node.monitor.drift import DriftConfig, check
from node.monitor.stats import confusion, weekly
from node.settings import Settings

EXPORT_COLUMNS = ("id", "created_at", "job_id", "plugin", "plugin_version", "rollout", "study_uid", "series_uid",
                  "reader", "target_kind", "target", "verdict", "comment", "meaning", "probability", "threshold",
                  "positive", "voxels", "findings")


def config(settings: Settings) -> DriftConfig:
    """The drift check's windows and thresholds from the monitoring_* settings."""
    return DriftConfig(window_days=settings.monitoring_window_days,
                       reference_days=settings.monitoring_reference_days,
                       reference_from=settings.monitoring_reference_from,
                       reference_to=settings.monitoring_reference_to,
                       psi_threshold=settings.monitoring_psi_threshold, ks_alpha=settings.monitoring_ks_alpha,
                       min_samples=settings.monitoring_min_samples)


def report(session: Session, settings: Settings, now: datetime, plugin: str | None = None) -> dict[str, Any]:
    """Drift results, weekly statistics and the agreement report per plugin (for the reference and the last
    window; weeks cover the reference_days + window_days before now). Raises SQLAlchemyError."""
    cfg = config(settings)
    (ref_from, ref_to), (rec_from, rec_to) = cfg.windows(now)
    reference = monitoring_rows(session, ref_from, ref_to, plugin)
    recent = monitoring_rows(session, rec_from, rec_to, plugin)
    drift = check(reference, recent, cfg)
    span_from = now - timedelta(days=cfg.window_days + cfg.reference_days)
    history = [r for r in reference if r["created_at"] >= span_from] + recent if ref_to == rec_from else \
        monitoring_rows(session, span_from, now, plugin)
    per_plugin: dict[str, dict[str, Any]] = defaultdict(lambda: {"drift": [], "rows": []})
    for d in drift:
        per_plugin[d["plugin"]]["drift"].append(d)
    for row in history:
        per_plugin[row["plugin"]]["rows"].append(row)
    plugins = [{"plugin": name, "warnings": sum(d["warning"] for d in p["drift"]), "drift": p["drift"],
                "weeks": weekly(p["rows"]), "agreement": confusion(p["rows"]), "jobs": len(p["rows"])}
               for name, p in sorted(per_plugin.items())]
    return {"generated_at": now.isoformat(),
            "window": {"from": rec_from.isoformat(), "to": rec_to.isoformat(), "jobs": len(recent)},
            "reference": {"from": ref_from.isoformat(), "to": ref_to.isoformat(), "jobs": len(reference),
                          "pinned": cfg.reference_from is not None},
            "thresholds": {"psi": cfg.psi_threshold, "ks_alpha": cfg.ks_alpha, "min_samples": cfg.min_samples},
            "warnings": sum(p["warnings"] for p in plugins), "plugins": plugins}


def gauges(session: Session, settings: Settings, now: datetime) -> list[tuple[str, str, str, float, bool]]:
    """(plugin, statistic, kind, score, warning) of every drift statistic now; a KS statistic also gives its p
    value as kind `ks_pvalue`. Raises SQLAlchemyError."""
    cfg = config(settings)
    (ref_from, ref_to), (rec_from, rec_to) = cfg.windows(now)
    out = []
    for d in check(monitoring_rows(session, ref_from, ref_to), monitoring_rows(session, rec_from, rec_to), cfg):
        out.append((d["plugin"], d["statistic"], d["kind"], d["score"], d["warning"]))
        if d["p_value"] is not None:
            out.append((d["plugin"], d["statistic"], "ks_pvalue", d["p_value"], d["warning"]))
    return out


def export_text(session: Session, fmt: str, plugin: str | None = None, since: datetime | None = None) -> str:
    """Every verdict with its job and findings as CSV (one line per verdict, the findings as a JSON cell) or
    JSON (a list). Raises ValueError for another format."""
    if fmt not in ("csv", "json"):
        raise ValueError(f"format must be csv or json, got {fmt!r}")
    rows = export_rows(session, plugin, since)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, EXPORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **row["subject"], "findings": json.dumps(row["findings"])})
    return buffer.getvalue()
