"""Classification metrics shared by the node (`radnode evaluate`) and the plugins (head training)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count half). Raises ValueError without both classes."""
    y = np.asarray(labels).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC needs positives and negatives")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% CI of the AUROC: 2.5th and 97.5th percentiles over `resamples` resamples with replacement
    (resamples lacking a class are left out). Raises ValueError without both classes."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    auroc(y, s)  # both classes present
    rng = np.random.default_rng(seed)
    n = len(y)
    values: list[np.ndarray] = []
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        yb, sb = y[idx], s[idx]
        n1 = yb.sum(axis=1)
        n0 = n - n1
        ranks = rankdata(sb, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            area = ((ranks * yb).sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
        values.append(area[(n1 > 0) & (n0 > 0)])
    areas = np.concatenate(values)
    lo, hi = np.percentile(areas, [2.5, 97.5])
    return float(lo), float(hi)
