"""Encode step: the Findings as `findings.json` plus the masks and heatmaps as `arrays.npz`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from plugins.base import Findings


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file, fsync, then rename (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_findings(findings: Findings, out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """Write the findings of one job (a re-run overwrites the same files). Returns the paths written.

    Raises OSError when the outputs folder cannot be written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    arrays = {f"mask:{s.segment}": np.asarray(s.mask, dtype=bool) for s in findings.segmentations}
    arrays |= {f"heatmap:{h.name}": np.asarray(h.values, dtype=np.float32) for h in findings.heatmaps}
    if arrays:
        path = out_dir / "arrays.npz"
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        written.append(path)
    path = out_dir / "findings.json"
    document = {**meta, **findings.to_json()}
    atomic_write(path, lambda f: f.write(json.dumps(document, indent=2).encode()))
    written.append(path)
    return written
