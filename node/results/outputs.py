"""Encode step entry: a job's Findings -> SEG, SR, SC heatmaps and findings.json under outputs/<job id>/."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.files import atomic_write
from node.results import object_file, object_kind
from node.results.common import ObjectRef, Provenance
from node.results.findings import write_findings
from node.results.sc import encode_sc
from node.results.seg import encode_seg
from node.results.sr import encode_sr
from plugins.base import Findings, Image


def read_sources(image: Image, paths_by_uid: Mapping[str, Path]) -> dict[str, Dataset]:
    """Headers (no pixels) of every source instance of `image`. Raises KeyError/OSError."""
    return {
        uid: dcmread(paths_by_uid[uid], stop_before_pixels=True)
        for uid in dict.fromkeys(s.sop_instance_uid for s in image.sources)
    }


def _save(ds: Dataset, path: Path) -> Path:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write(path, buffer.getvalue())
    return path


def write_outputs(findings: Findings, image: Image, sources: Mapping[str, Dataset], prov: Provenance,
                  source_series_uid: str, out_dir: Path, meta: dict[str, Any], sc_max_images: int = 3,
                  timings: dict[str, float] | None = None) -> list[Path]:
    """Encode the objects the manifest declares and write them with findings.json; returns the paths.

    A re-run writes the same file names and the same UIDs. `timings`, when given, receives the seconds
    spent per object kind (SEG, SR, SC, findings). Raises ValueError (findings the encoders cannot
    represent) or OSError.
    """
    with warnings.catch_warnings():
        # highdicom and pydicom quote the offending value (a patient's name) in these warnings: PHI
        warnings.filterwarnings("ignore", message=r".*person name.*")
        warnings.filterwarnings("ignore", message=r".*Invalid value for VR.*")
        return _write(findings, image, sources, prov, source_series_uid, out_dir, meta, sc_max_images,
                      timings if timings is not None else {})


def _write(findings: Findings, image: Image, sources: Mapping[str, Dataset], prov: Provenance,
           source_series_uid: str, out_dir: Path, meta: dict[str, Any], sc_max_images: int,
           timings: dict[str, float]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("*.dcm"), *out_dir.glob("*.part")]:
        old.unlink()  # other SC slices of an earlier run, a killed run's temporary file: keep this run's only
    kinds = set(prov.manifest.outputs)
    written: list[Path] = []

    def arrays() -> list[Path]:  # numpy and zlib only (no shared DICOM datasets): safe beside the encoders
        t0 = time.perf_counter()
        paths = write_findings(findings, out_dir, meta)
        timings["findings"] = round(time.perf_counter() - t0, 3)
        return paths

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="findings") as pool:
        background = pool.submit(arrays)
        t = time.perf_counter()

        def lap(kind: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[kind] = round(now - t, 3)
            t = now

        seg = encode_seg(findings, image, sources, prov, source_series_uid) if "SEG" in kinds else None
        if seg is not None:
            written.append(_save(seg, out_dir / object_file("SEG")))
            lap("SEG")
        if "SR" in kinds:
            sr = encode_sr(findings, image, sources, prov, source_series_uid, seg=seg)
            written.append(_save(sr, out_dir / object_file("SR")))
            lap("SR")
        if "SC" in kinds:
            for i, sc in enumerate(encode_sc(findings, image, sources, prov, source_series_uid, sc_max_images)):
                written.append(_save(sc, out_dir / object_file("SC", i + 1)))
            lap("SC")
        return written + background.result()


def object_refs(paths: list[Path]) -> list[ObjectRef]:
    """The identities of the encoded objects among a job's output files (headers only), for the job table."""
    refs = []
    for path in paths:
        kind = object_kind(path)
        if kind is not None:
            refs.append(ObjectRef.of(dcmread(path, stop_before_pixels=True), kind))
    return refs
