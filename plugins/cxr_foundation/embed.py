"""cxr-foundation embeddings of many studies: images loaded one by one, embedded in batches on the plugin's
device, written to and loaded from one .npz file with their ids (`radnode embed`, which writes the file
through the node's atomic writer: `EmbeddingSet.write` fills a binary file).

The file holds, for n embedded studies: `ids` (n,) and, per layer (final; penultimate with the prefix
`penultimate_`), `cls` (n, D), `registers` (n, R, D) and `patch_mean` (n, D) (the mean of the N patch
tokens) as float32; with `patches=True` also every patch token, `patches` (n, N, D) as float16 (N x D x 2
bytes a study: 2.8 MB at 518 px for ViT-L); `meta` (JSON: model, image size, backbone SHA-256, ...).
Studies that could not be embedded are listed in `failed_ids` / `failed_reasons`.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from plugins.base import Image, NotApplicable

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "radnode-cxr-foundation-embeddings/1"
LAYERS = ("", "penultimate_")  # key prefixes: final layer, penultimate layer
POOLED = ("cls", "registers", "patch_mean")


@dataclass
class EmbeddingSet:
    """Embeddings of many studies: `arrays[key]` has one row per id; `failed` maps an id to why it has none."""

    ids: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    failed: dict[str, str] = field(default_factory=dict)

    def write(self, file: BinaryIO) -> None:
        """Write the set as an .npz archive (no pickles) to a binary file. Raises ValueError for arrays whose
        rows do not match the ids or that take a reserved name, OSError."""
        for key, array in self.arrays.items():
            if len(array) != len(self.ids):
                raise ValueError(f"{key} has {len(array)} rows for {len(self.ids)} ids")
        reserved = {"ids", "meta", "failed_ids", "failed_reasons"} & set(self.arrays)
        if reserved:
            raise ValueError(f"array names {sorted(reserved)} are reserved")
        meta = dict(self.meta, format=EMBEDDINGS_FORMAT)
        np.savez(file, ids=np.array(self.ids, dtype=str), meta=np.array(json.dumps(meta)),
                 failed_ids=np.array(list(self.failed), dtype=str),
                 failed_reasons=np.array(list(self.failed.values()), dtype=str), **self.arrays)


class Embedder(Protocol):
    """What `embed_paths` uses of the plugin (model.CxrFoundation, loaded with or without heads)."""

    def prepare(self, image: Image) -> tuple[np.ndarray, Any]: ...

    def embed_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def embedding_meta(self) -> dict[str, Any]: ...


def embed_paths(plugin: Embedder, items: Sequence[tuple[str, Sequence[Path]]],
                load: Callable[[Sequence[Path]], Image], batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None, patches: bool = False) -> EmbeddingSet:
    """Embed each item (an id and the DICOM files of its one X-ray image) with a loaded plugin (heads not
    needed: `plugin.load(device, weights, heads=False)`).

    `load` turns the files into a plugins.base.Image (the CLI passes node.imaging.load_image); an item it
    cannot load (ValueError, OSError) or that is not a 2-D X-ray is recorded in `failed` with the reason
    and left out. `progress(done, total)` is called after each item. Raises ValueError for repeated ids
    or batch_size < 1, RuntimeError when the plugin is not loaded."""
    ids = [str(i) for i, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    done: list[str] = []
    rows: dict[str, list[np.ndarray]] = {}
    failed: dict[str, str] = {}
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        out = plugin.embed_batch(np.stack([a for _, a in pending]))
        for prefix in LAYERS:
            rows.setdefault(f"{prefix}cls", []).append(out[f"{prefix}cls"])
            rows.setdefault(f"{prefix}registers", []).append(out[f"{prefix}registers"])
            rows.setdefault(f"{prefix}patch_mean", []).append(out[f"{prefix}patches"].mean(axis=1))
            if patches:
                rows.setdefault(f"{prefix}patches", []).append(out[f"{prefix}patches"].astype(np.float16))
        done.extend(i for i, _ in pending)
        pending.clear()

    for n, (item_id, paths) in enumerate(items, start=1):
        try:
            array, _ = plugin.prepare(load(list(paths)))
        except (ValueError, OSError, NotApplicable) as exc:
            failed[str(item_id)] = f"{type(exc).__name__}: {exc}"
        else:
            pending.append((str(item_id), array))
            if len(pending) == batch_size:
                flush()
        if progress is not None:
            progress(n, len(items))
    flush()
    if failed:
        log.warning("%d of %d item(s) could not be embedded", len(failed), len(items))
    arrays = {key: np.concatenate(parts) for key, parts in rows.items()}
    return EmbeddingSet(done, arrays, plugin.embedding_meta(), failed)


def save_embeddings(path: Path, embedded: EmbeddingSet) -> Path:
    """Write the set to the .npz file `path` (a plain write, for tests and scripts: `radnode embed` writes
    `EmbeddingSet.write` through the node's atomic writer). Raises ValueError (see `write`), OSError."""
    buffer = io.BytesIO()
    embedded.write(buffer)  # before touching `path`: a refused set leaves no file behind
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def load_embeddings(path: Path) -> EmbeddingSet:
    """Read a file written by `save_embeddings`. Raises ValueError when it is not one, OSError."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not an embeddings file ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an embeddings file (one array, not an .npz archive)")
    with data:
        contents = {key: data[key] for key in data.files}
    try:
        meta = json.loads(str(contents.pop("meta")))
        ids = [str(i) for i in contents.pop("ids")]
        failed = dict(zip((str(i) for i in contents.pop("failed_ids")),
                          (str(r) for r in contents.pop("failed_reasons")), strict=True))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not an embeddings file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {EMBEDDINGS_FORMAT!r}")
    return EmbeddingSet(ids, contents, meta, failed)
