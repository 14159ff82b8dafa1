"""Monitoring, drift: the last window of jobs against a reference window, per plugin and statistic.

- binned and categorical statistics (kernel, scanner model, station, positive/negative per finding, slice
  thickness, pixel spacing, probability per finding, the intensity histogram): population stability index,
  PSI = sum((recent - reference) * ln(recent / reference)) over the bins' shares. Counts get half a count
  added in each bin that either window uses (empty bins would make it infinite); the intensity histogram is
  the mean of the jobs' own normalised histograms (a floor of 1e-4 per bin). Warning when PSI > threshold.
- continuous statistics (mean and spread of intensity, each measurement): two-sample Kolmogorov-Smirnov test;
  warning when p < alpha.
Either needs at least `min_samples` jobs in each window; otherwise the statistic is reported without warning.
PSI has a small-sample bias of about (bins - 1) * (1/n_reference + 1/n_recent): keep `min_samples` well above
the number of bins in use.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from node.monitor.stats import observations

SLICE_EDGES = (0.0, 0.75, 1.25, 1.75, 2.25, 2.75, 3.5, 4.5, 5.5, 8.0, math.inf)
SPACING_EDGES = (0.0, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, math.inf)
PROBABILITY_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, math.inf)
BINNED = {"slice_thickness": SLICE_EDGES, "pixel_spacing": SPACING_EDGES}
PSEUDO_COUNT = 0.5
HISTOGRAM_FLOOR = 1e-4


@dataclass(frozen=True)
class DriftConfig:
    """Window lengths, an optional pinned reference period, and the warning thresholds."""

    window_days: float = 7.0
    reference_days: float = 28.0
    reference_from: datetime | None = None
    reference_to: datetime | None = None
    psi_threshold: float = 0.2
    ks_alpha: float = 0.01
    min_samples: int = 20

    def windows(self, now: datetime) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
        """((reference from, to), (recent from, to)): the recent window ends now; the reference is the pinned
        period, else the `reference_days` before the recent window."""
        recent = (now - timedelta(days=self.window_days), now)
        if self.reference_from is not None and self.reference_to is not None:
            return (self.reference_from, self.reference_to), recent
        return (recent[0] - timedelta(days=self.reference_days), recent[0]), recent


def psi(reference: list[float], recent: list[float]) -> float:
    """Population stability index of two lists of shares (each summing to 1, no zeros)."""
    return float(sum((b - a) * math.log(b / a) for a, b in zip(reference, recent, strict=True)))


def _shares(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts]


def _bin(value: float, edges: tuple[float, ...]) -> int:
    return next(i for i in range(len(edges) - 1) if value < edges[i + 1])


def _edge_label(edges: tuple[float, ...], i: int) -> str:
    return f"≥{edges[i]:g}" if math.isinf(edges[i + 1]) else f"{edges[i]:g}–{edges[i + 1]:g}"


def _counted(ref: Counter, cur: Counter, labels: list[str]) -> tuple[float, dict[str, Any]]:
    """PSI of two count tables over the labels either uses (half a count added to each)."""
    used = [k for k in labels if ref[k] or cur[k]]
    a = _shares([ref[k] + PSEUDO_COUNT for k in used])
    b = _shares([cur[k] + PSEUDO_COUNT for k in used])
    return psi(a, b), {"labels": used, "reference": _shares([ref[k] for k in used]) if sum(ref.values()) else [],
                       "recent": _shares([cur[k] for k in used]) if sum(cur.values()) else []}


def _histogram(ref: list[Any], cur: list[Any]) -> tuple[float, int, int, dict[str, Any]] | None:
    """PSI of the mean normalised intensity histograms, over the edges most recent jobs use."""
    common = Counter(h[0] for h in cur).most_common(1) or Counter(h[0] for h in ref).most_common(1)
    if not common:
        return None
    edges = common[0][0]
    a = [h[1] for h in ref if h[0] == edges]
    b = [h[1] for h in cur if h[0] == edges]
    if not a or not b:
        return None

    def mean(hs: list[list[float]]) -> list[float]:
        return _shares([max(sum(col) / len(hs), HISTOGRAM_FLOOR) for col in zip(*hs, strict=True)])

    ma, mb = mean(a), mean(b)
    labels = [_edge_label(edges, i) for i in range(len(edges) - 1)]
    return psi(ma, mb), len(a), len(b), {"labels": labels, "reference": ma, "recent": mb}


def check(reference: list[dict[str, Any]], recent: list[dict[str, Any]], config: DriftConfig) -> list[dict[str, Any]]:
    """Drift of every statistic of every plugin between two lists of monitoring rows (db.feedback.monitoring_rows),
    sorted by plugin and statistic. Each result: plugin, statistic, kind (psi | ks), score (PSI, or the KS
    statistic), p_value (KS), reference_n, recent_n, warning, note, detail (shares per bin for PSI)."""
    per_plugin: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for i, rows in enumerate((reference, recent)):
        for row in rows:
            per_plugin[row["plugin"]][i].append(observations(row))
    return [d for plugin, (ref, cur) in sorted(per_plugin.items()) for d in _plugin(plugin, ref, cur, config)]


def _plugin(plugin: str, ref: list[dict[str, Any]], cur: list[dict[str, Any]],
            config: DriftConfig) -> list[dict[str, Any]]:
    """The drift results of one plugin's observations, sorted by statistic."""
    from scipy.stats import ks_2samp

    results: list[dict[str, Any]] = []

    def add(statistic: str, kind: str, score: float, n_ref: int, n_cur: int, p: float | None = None,
            detail: dict[str, Any] | None = None) -> None:
        enough = min(n_ref, n_cur) >= config.min_samples
        warning = enough and (score > config.psi_threshold if kind == "psi" else p < config.ks_alpha)
        note = "" if enough else f"too few samples ({n_ref} reference, {n_cur} recent; {config.min_samples} needed)"
        results.append({"plugin": plugin, "statistic": statistic, "kind": kind, "score": round(score, 6),
                        "p_value": None if p is None else float(p), "reference_n": n_ref, "recent_n": n_cur,
                        "warning": bool(warning), "note": note, "detail": detail or {}})

    for name in sorted({k for o in ref + cur for k in o["categories"]}):
        a = Counter(o["categories"][name] for o in ref if name in o["categories"])
        b = Counter(o["categories"][name] for o in cur if name in o["categories"])
        if a and b:
            score, detail = _counted(a, b, sorted(set(a) | set(b)))
            add(name.replace("positive:", "positive_rate:"), "psi", score, sum(a.values()), sum(b.values()),
                detail=detail)
    for name in sorted({k for o in ref + cur for k in o["values"]}):
        xs = [o["values"][name] for o in ref if name in o["values"]]
        ys = [o["values"][name] for o in cur if name in o["values"]]
        if not xs or not ys:
            continue
        edges = BINNED.get(name) or (PROBABILITY_EDGES if name.startswith("probability:") else None)
        if edges:
            labels = [_edge_label(edges, i) for i in range(len(edges) - 1)]
            score, detail = _counted(Counter(labels[_bin(x, edges)] for x in xs),
                                     Counter(labels[_bin(y, edges)] for y in ys), labels)
            add(name, "psi", score, len(xs), len(ys), detail=detail)
        else:
            test = ks_2samp(xs, ys)
            add(name, "ks", float(test.statistic), len(xs), len(ys), float(test.pvalue),
                {"reference_median": sorted(xs)[len(xs) // 2], "recent_median": sorted(ys)[len(ys) // 2]})
    hist = _histogram([o["histogram"] for o in ref if o["histogram"]], [o["histogram"] for o in cur if o["histogram"]])
    if hist:
        add("intensity_histogram", "psi", hist[0], hist[1], hist[2], detail=hist[3])
    return sorted(results, key=lambda r: r["statistic"])
