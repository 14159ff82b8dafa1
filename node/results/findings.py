"""Encode step: the Findings as `findings.json` plus the masks and heatmaps as `arrays.npz`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from node.files import atomic_write
from plugins.base import Findings


def heatmap_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _savez_fast(f, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with zlib level 1 (the default level 6 is several times slower here)."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def write_findings(findings: Findings, out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """Write the findings of one job (a re-run overwrites the same files). Returns the paths written.

    Raises OSError when the outputs folder cannot be written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    arrays = {f"mask:{s.segment}": np.asarray(s.mask, dtype=bool) for s in findings.segmentations}
    # heatmaps quantised to uint8 (value = stored / 255): a float32 volume costs seconds to compress
    arrays |= {f"heatmap:{h.name}": heatmap_uint8(h.values) for h in findings.heatmaps}
    if arrays:
        path = out_dir / "arrays.npz"
        atomic_write(path, lambda f: _savez_fast(f, arrays))
        written.append(path)
    path = out_dir / "findings.json"
    document = {**meta, **findings.to_json()}
    atomic_write(path, json.dumps(document, indent=2).encode())
    written.append(path)
    return written
