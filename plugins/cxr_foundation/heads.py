"""cxr-foundation heads: the heads file, its training on saved embeddings, and the labels.csv reader.

One head per finding, all reading the final layer of the backbone (after its LayerNorm):

- the pooled head gives the finding's probability: a linear map (or a small MLP: `hidden` units, GELU) of
  concat[cls, mean(patches)] (2 x D values);
- the patch head gives the heatmap: a linear map of each patch token (D values) -> a (sqrt(N) x sqrt(N)) grid
  of logits. It is trained with the image labels as a linear head on mean(patches): a linear map commutes
  with the mean, so the image's logit is the mean of its patch logits (mean-pooling multiple-instance
  learning) and training needs the pooled embeddings only, never every patch of every study.

Training (`train_heads`) fits each finding on its own labelled studies: a stratified split (the same share of
positives in training and validation), features standardised on the training split (folded into the written
weights), the positive class weighted by negatives/positives (BCE pos_weight), AdamW for a fixed number of
epochs (the validation split is never used for fitting or stopping). The report gives the validation AUROC
with a bootstrap 95% CI (percentiles of resampled AUROCs) and the threshold of the largest Youden's J on the
validation split (so the sensitivity/specificity reported at that threshold are optimistic).

The heads file (safetensors) holds, for K findings in the order of its metadata "findings":
`pooled.weight` (K, 2D) and `pooled.bias` (K) — or `pooled.hidden.weight` (K, H, 2D), `pooled.hidden.bias`
(K, H), `pooled.out.weight` (K, H), `pooled.out.bias` (K) for MLP heads — `patch.weight` (K, D), `patch.bias`
(K) and `thresholds` (K); metadata "format", "findings" (JSON), "pooling", and when trained here
"backbone_sha256" (of the backbone that made the embeddings) and "report" (JSON).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from plugins.base import WeightsUnavailable
from plugins.cxr_foundation import FINDINGS
from plugins.cxr_foundation.embed import load_embeddings
from plugins.metrics import auroc, bootstrap_auroc  # noqa: F401  (part of this module's API)
from plugins.torch_common import load_weights

HEADS_FORMAT = "radnode-cxr-foundation-heads/1"
POOLING = "concat[cls, mean(patches)], final layer after its LayerNorm"
MIN_PER_CLASS = 2  # labelled positives and negatives a finding needs (one each for training and validation)
SMALL_VALIDATION = 10  # fewer validation positives or negatives than this: the report warns of a wide CI


# --- the heads module (inference and the file) ---------------------------------------------------------


class _Grouped(nn.Module):
    """Parameters of K independent layers, one per finding."""

    def __init__(self, weight: tuple[int, ...], bias: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(weight))
        self.bias = nn.Parameter(torch.zeros(bias))


class _Mlp(nn.Module):
    """K independent MLPs (F -> H -> 1, GELU) of the same input: (B, F) -> (B, K)."""

    def __init__(self, count: int, features: int, hidden: int) -> None:
        super().__init__()
        self.hidden = _Grouped((count, hidden, features), (count, hidden))
        self.out = _Grouped((count, hidden), (count,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(torch.einsum("bf,khf->bkh", x, self.hidden.weight) + self.hidden.bias)
        return (h * self.out.weight).sum(dim=-1) + self.out.bias


class _Linear(_Grouped):
    """K independent linear maps of the same input: (B, F) -> (B, K)."""

    def __init__(self, count: int, features: int) -> None:
        super().__init__((count, features), (count,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class Heads(nn.Module):
    """The heads of K findings on final-layer tokens of dimension `dim`; `hidden` 0 = linear pooled heads."""

    def __init__(self, dim: int, count: int, hidden: int = 0) -> None:
        super().__init__()
        self.pooled = _Linear(count, 2 * dim) if hidden == 0 else _Mlp(count, 2 * dim, hidden)
        self.patch = _Linear(count, dim)
        self.register_buffer("thresholds", torch.full((count,), 0.5))

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls (B, D), patches (B, N, D) -> logits (B, K), patch logits (B, K, N)."""
        pooled = torch.cat([cls, patches.mean(dim=1)], dim=1)
        patch_logits = patches @ self.patch.weight.T + self.patch.bias
        return self.pooled(pooled), patch_logits.transpose(1, 2)


@dataclass
class HeadsFile:
    """A loaded heads file: the module (eval mode, CPU), its findings in head order, its metadata."""

    heads: Heads
    findings: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _architecture(shapes: Mapping[str, Sequence[int]]) -> tuple[int, int, int]:
    """(dim, count, hidden) from the tensor shapes of a heads state. Raises KeyError/ValueError."""
    count, dim = (int(v) for v in shapes["patch.weight"])
    hidden = int(shapes["pooled.hidden.weight"][1]) if "pooled.hidden.weight" in shapes else 0
    return dim, count, hidden


def load_heads(path: Path, dim: int | None = None) -> HeadsFile:
    """Read a heads file. `dim`: the backbone's embedding dimension the heads must fit.

    Raises WeightsUnavailable when the file is missing, not a heads file, or does not fit `dim`."""
    if not path.is_file():
        raise WeightsUnavailable(f"heads file {path} not found: train heads on embeddings (`radnode train-head`)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsUnavailable(f"{path}: not a safetensors file ({exc})") from exc
    if meta.get("format") != HEADS_FORMAT:
        raise WeightsUnavailable(f"{path}: not a cxr-foundation heads file (format {meta.get('format')!r}, "
                                 f"expected {HEADS_FORMAT!r})")
    try:
        findings = json.loads(meta["findings"])
        file_dim, count, hidden = _architecture(shapes)
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsUnavailable(f"{path}: incomplete heads file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(findings, list) or len(findings) != count:
        raise WeightsUnavailable(f"{path}: metadata names {findings!r} for {count} heads")
    if dim is not None and file_dim != dim:
        raise WeightsUnavailable(f"{path}: heads for {file_dim}-dimensional embeddings, the backbone gives {dim}")
    heads = load_weights(Heads(file_dim, count, hidden), path)
    parsed: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            parsed[key] = json.loads(value) if key in ("findings", "report") else value
        except ValueError:
            parsed[key] = value
    return HeadsFile(heads, [str(f) for f in findings], parsed)


def save_heads(path: Path, state: Mapping[str, torch.Tensor], findings: Sequence[str],
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write `heads_file_bytes(state, findings, meta)` to `path` (a plain write, for tests and scripts:
    `radnode train-head` writes the bytes through the node's atomic writer). Raises ValueError, OSError."""
    data = heads_file_bytes(state, findings, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def heads_file_bytes(state: Mapping[str, torch.Tensor], findings: Sequence[str],
                     meta: Mapping[str, Any] | None = None) -> bytes:
    """A heads file's content (safetensors) from a Heads state dict (as `train_heads` returns) and its findings.

    `meta` values are stored as text (JSON for anything but a string). Raises ValueError when the state
    is not a complete Heads state for these findings or a finding is not in FINDINGS."""
    _check_findings(findings)
    try:
        dim, count, hidden = _architecture({k: tuple(v.shape) for k, v in state.items()})
    except (KeyError, ValueError) as exc:
        raise ValueError(f"not a heads state ({type(exc).__name__}: {exc})") from exc
    if count != len(findings):
        raise ValueError(f"the state holds {count} heads for {len(findings)} findings")
    module = Heads(dim, count, hidden)
    module.load_state_dict(dict(state), strict=True)  # raises on missing, unexpected or mis-shaped tensors
    metadata = {"format": HEADS_FORMAT, "findings": json.dumps(list(findings)), "pooling": POOLING}
    for key, value in (meta or {}).items():
        if value is not None:
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().float().contiguous() for k, v in module.state_dict().items()}
    return save(tensors, metadata=metadata)  # bytes, written by the caller (save_file would make the file 0600)


def _check_findings(findings: Sequence[str]) -> None:
    if not findings:
        raise ValueError("no findings given")
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding(s) {', '.join(map(repr, unknown))}: the plugin reports coded findings "
                         f"only ({', '.join(FINDINGS)})")
    if len(set(findings)) != len(findings):
        raise ValueError("findings must be unique")


# --- metrics -------------------------------------------------------------------------------------------


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) at the largest Youden's J (positive = probability >= threshold)."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probabilities, dtype=np.float64)
    best = (-2.0, 0.5, 0.0, 0.0)
    for t in np.unique(p):
        predicted = p >= t
        sens = float((predicted & y).sum() / max(1, y.sum()))
        spec = float((~predicted & ~y).sum() / max(1, (~y).sum()))
        if sens + spec - 1.0 > best[0]:
            best = (sens + spec - 1.0, float(t), sens, spec)
    return best[1], best[2], best[3]


def stratified_split(labels: np.ndarray, val_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices: each class split in the same proportion, at least one of each class
    on both sides. Raises ValueError for a fraction outside (0, 1) or a class with fewer than 2 members."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    y = np.asarray(labels)
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(y == cls))
        if len(members) < MIN_PER_CLASS:
            raise ValueError(f"{len(members)} {'positive' if cls else 'negative'} label(s): at least "
                             f"{MIN_PER_CLASS} are needed")
        k = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --- training ------------------------------------------------------------------------------------------


def _fit(x: np.ndarray, y: np.ndarray, hidden: int, seed: int, epochs: int, lr: float, weight_decay: float,
         batch_size: int) -> list[torch.Tensor]:
    """Fit one finding's head on standardised features; return its layers with the standardisation folded
    in: [weight (F,), bias ()] for a linear head, [W1 (H, F), b1 (H,), w2 (H,), b2 ()] for an MLP."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-6] = 1.0
    z = torch.from_numpy(((x - mean) / std).astype(np.float32))
    target = torch.from_numpy(y.astype(np.float32))
    positives = float(y.sum())
    pos_weight = torch.tensor((len(y) - positives) / positives)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # heads are small: one thread is several times faster than a synchronised pool
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = [nn.Linear(z.shape[1], hidden), nn.GELU(), nn.Linear(hidden, 1)] if hidden \
                else [nn.Linear(z.shape[1], 1)]
            model = nn.Sequential(*layers)
            generator = torch.Generator().manual_seed(seed)
            optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(z), generator=generator)
                for start in range(0, len(z), batch_size):
                    batch = order[start:start + batch_size]
                    optimiser.zero_grad()
                    loss_fn(model(z[batch]).squeeze(1), target[batch]).backward()
                    optimiser.step()
    finally:
        torch.set_num_threads(threads)
    first = model[0]
    scale = torch.from_numpy((1.0 / std).astype(np.float32))
    shift = torch.from_numpy((mean / std).astype(np.float32))
    w = first.weight.detach() * scale  # x -> W (x - mean) / std + b  ==  (W / std) x + (b - W mean / std)
    b = first.bias.detach() - first.weight.detach() @ shift
    if not hidden:
        return [w[0], b[0]]
    last = model[2]
    return [w, b, last.weight.detach()[0], last.bias.detach()[0]]


def train_heads(embeddings: Mapping[str, np.ndarray], ids: Sequence[str], labels: Mapping[str, Mapping[str, int]],
                findings: Sequence[str], seed: int = 0, val_fraction: float = 0.2, epochs: int = 100,
                hidden: int = 0, lr: float = 3e-3, weight_decay: float = 1e-2, batch_size: int = 64,
                bootstrap: int = 1000) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the heads of `findings` on saved embeddings; return the Heads state dict and a JSON-able report.

    `embeddings` holds "cls" and "patch_mean" (n, D) (final layer, as `embed.embed_paths` writes them) for
    `ids` (n); `labels` maps an id to {finding: 0/1} (a finding left out = unknown for that id). Labelled
    ids without embeddings are counted in the report and ignored. Raises ValueError for missing or
    mis-shaped arrays, unknown or repeated findings, or a finding with fewer than 2 positives or negatives.
    """
    _check_findings(findings)
    if hidden < 0 or epochs < 1 or bootstrap < 1:
        raise ValueError("hidden must be >= 0, epochs and bootstrap >= 1")
    if "cls" not in embeddings or "patch_mean" not in embeddings:
        raise ValueError(f"embeddings need 'cls' and 'patch_mean' arrays, got {', '.join(sorted(embeddings))}")
    cls = np.asarray(embeddings["cls"], dtype=np.float32)
    patch_mean = np.asarray(embeddings["patch_mean"], dtype=np.float32)
    if cls.ndim != 2 or cls.shape != patch_mean.shape or len(cls) != len(ids):
        raise ValueError(f"cls {cls.shape} and patch_mean {patch_mean.shape} must both be (n, D) for {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    index = {str(i): n for n, i in enumerate(ids)}
    pooled = np.concatenate([cls, patch_mean], axis=1)
    dim = cls.shape[1]
    parts: dict[str, list[list[torch.Tensor]]] = {"pooled": [], "patch": []}
    thresholds: list[float] = []
    reports: dict[str, Any] = {}
    for k, finding in enumerate(findings):
        rows = [(index[i], v[finding]) for i, v in labels.items() if i in index and finding in v]
        if not rows:
            raise ValueError(f"{finding}: no labelled study has embeddings")
        where = np.array([r for r, _ in rows])
        y = np.array([v for _, v in rows])
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{finding}: labels must be 0 or 1")
        y = y.astype(np.int64)
        try:
            train, val = stratified_split(y, val_fraction, np.random.default_rng([seed, k]))
        except ValueError as exc:
            raise ValueError(f"{finding}: {exc}") from None
        fit = dict(seed=seed * 1000 + k, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size)
        parts["pooled"].append(_fit(pooled[where[train]], y[train], hidden, **fit))
        parts["patch"].append(_fit(patch_mean[where[train]], y[train], 0, **fit))
        one = _assemble(parts, [0.5], dim, hidden, only=-1)
        with torch.inference_mode():
            # patches = their mean alone: the patch head's image logit is its logit of mean(patches)
            logits, patch_logits = one(torch.from_numpy(cls[where[val]]),
                                       torch.from_numpy(patch_mean[where[val]])[:, None])
        scores, patch_scores = logits[:, 0].numpy(), patch_logits[:, 0, 0].numpy()
        probability = sigmoid(scores)
        threshold, sensitivity, specificity = youden_threshold(y[val], probability)
        thresholds.append(threshold)
        lo, hi = bootstrap_auroc(y[val], scores, bootstrap, seed)
        positives_val = int(y[val].sum())
        report: dict[str, Any] = {
            "code": FINDINGS[finding].value,
            "meaning": FINDINGS[finding].meaning,
            "n_train": len(train),
            "n_val": len(val),
            "positives_train": int(y[train].sum()),
            "positives_val": positives_val,
            "pos_weight": round(float((len(train) - y[train].sum()) / y[train].sum()), 4),
            "auroc": round(auroc(y[val], scores), 4),
            "auroc_ci95": [round(lo, 4), round(hi, 4)],
            "patch_auroc": round(auroc(y[val], patch_scores), 4),
            "threshold": round(threshold, 6),
            "sensitivity": round(sensitivity, 4),
            "specificity": round(specificity, 4),
        }
        if min(positives_val, len(val) - positives_val) < SMALL_VALIDATION:
            report["warning"] = (f"only {positives_val} positive and {len(val) - positives_val} negative "
                                 "validation studies: the AUROC and its CI are unreliable")
        reports[finding] = report
    heads = _assemble(parts, thresholds, dim, hidden)
    labelled_known = sum(1 for i in labels if i in index)
    return {k: v.clone() for k, v in heads.state_dict().items()}, {
        "findings": reports,
        "pooling": POOLING,
        "head": f"MLP ({hidden} hidden units, GELU)" if hidden else "linear",
        "patch_head": "linear per patch token, trained on mean(patches) (mean-pooling MIL)",
        "threshold_rule": "largest Youden's J on the validation split",
        "ci": f"bootstrap 95% percentile interval, {bootstrap} resamples of the validation split",
        "seed": seed,
        "val_fraction": val_fraction,
        "epochs": epochs,
        "embeddings": len(ids),
        "labelled_with_embeddings": labelled_known,
        "labelled_without_embeddings": len(labels) - labelled_known,
    }


def _assemble(parts: Mapping[str, list[list[torch.Tensor]]], thresholds: Sequence[float], dim: int, hidden: int,
              only: int | None = None) -> Heads:
    """A Heads module from fitted per-finding layers (all of them, or just index `only`)."""
    pooled = parts["pooled"] if only is None else [parts["pooled"][only]]
    patch = parts["patch"] if only is None else [parts["patch"][only]]
    heads = Heads(dim, len(pooled), hidden).eval()
    with torch.no_grad():
        if hidden:
            heads.pooled.hidden.weight.copy_(torch.stack([p[0] for p in pooled]))
            heads.pooled.hidden.bias.copy_(torch.stack([p[1] for p in pooled]))
            heads.pooled.out.weight.copy_(torch.stack([p[2] for p in pooled]))
            heads.pooled.out.bias.copy_(torch.stack([p[3] for p in pooled]))
        else:
            heads.pooled.weight.copy_(torch.stack([p[0] for p in pooled]))
            heads.pooled.bias.copy_(torch.stack([p[1] for p in pooled]))
        heads.patch.weight.copy_(torch.stack([p[0] for p in patch]))
        heads.patch.bias.copy_(torch.stack([p[1] for p in patch]))
        heads.thresholds.copy_(torch.tensor(list(thresholds), dtype=torch.float32))
    return heads


# --- labels.csv and the file-to-file entry --------------------------------------------------------------


class LabelsError(ValueError):
    """labels.csv cannot be used; the message names the line."""


def read_labels(path: Path) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Findings (the columns after `id`, in order) and id -> {finding: 0/1} from a labels CSV.

    The header is `id` then one column per finding (a key of FINDINGS, e.g. pleural_effusion); a value is
    0, 1 or empty (unknown: left out of that finding's training). Raises LabelsError naming the line for
    a bad header, an empty or repeated id, or another value."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            if not header or header[0].lower() != "id":
                raise LabelsError(f"{path}: the first column must be `id`, then one column per finding")
            columns = header[1:]
            if not columns or any(not c for c in columns) or len(set(columns)) != len(columns):
                raise LabelsError(f"{path}: the finding columns must be named and unique, got {columns}")
            labels: dict[str, dict[str, int]] = {}
            for line, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise LabelsError(f"{path} line {line}: {len(row)} values for {len(header)} columns")
                case = row[0].strip()
                if not case:
                    raise LabelsError(f"{path} line {line}: empty id")
                if case in labels:
                    raise LabelsError(f"{path} line {line}: id {case!r} appears twice")
                values: dict[str, int] = {}
                for column, cell in zip(columns, row[1:], strict=True):
                    cell = cell.strip()
                    if cell in ("0", "1"):
                        values[column] = int(cell)
                    elif cell:
                        raise LabelsError(f"{path} line {line}: {column} is {cell!r}; use 0, 1 or leave it empty "
                                          "(unknown)")
                labels[case] = values
    except OSError as exc:
        raise LabelsError(f"{path}: {exc.strerror}") from None
    except csv.Error as exc:
        raise LabelsError(f"{path}: not a CSV file ({exc})") from None
    if not labels:
        raise LabelsError(f"{path}: no labelled studies")
    return columns, labels


def train_heads_file(embeddings: Path, labels: Path, out: Path, findings: Sequence[str] | None = None,
                     seed: int = 0, val_fraction: float = 0.2, epochs: int = 100, hidden: int = 0) -> dict[str, Any]:
    """`train_heads_from_files`, the heads file written to `out` (a plain write, for tests and scripts);
    returns the report. Raises LabelsError / ValueError, OSError."""
    report, content = train_heads_from_files(embeddings, labels, findings, seed=seed, val_fraction=val_fraction,
                                             epochs=epochs, hidden=hidden)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(content)
    return report


def train_heads_from_files(embeddings: Path, labels: Path, findings: Sequence[str] | None = None, seed: int = 0,
                           val_fraction: float = 0.2, epochs: int = 100,
                           hidden: int = 0) -> tuple[dict[str, Any], bytes]:
    """`radnode train-head`: embeddings file + labels.csv -> (report, heads file content).

    `findings` defaults to the label columns. The heads file records the SHA-256 of the backbone that made
    the embeddings, so the plugin refuses it beside another backbone. Raises LabelsError / ValueError
    (bad labels, embeddings or training data) or OSError."""
    embedded = load_embeddings(embeddings)
    columns, table = read_labels(labels)
    wanted = list(findings) if findings else columns
    missing = [f for f in wanted if f not in columns]
    if missing:
        raise LabelsError(f"{labels}: no column for {', '.join(missing)}")
    state, report = train_heads(embedded.arrays, embedded.ids, table, wanted, seed=seed, val_fraction=val_fraction,
                                epochs=epochs, hidden=hidden)
    report["backbone_sha256"] = embedded.meta.get("backbone_sha256")
    content = heads_file_bytes(state, wanted, {"backbone_sha256": embedded.meta.get("backbone_sha256"),
                                               "report": report})
    return report, content


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float32, without overflow warnings."""
    x = np.asarray(x, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)

