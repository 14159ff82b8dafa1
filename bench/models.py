"""Model benchmark: per plugin, the full-size architecture (generated random weights: the real ones are
private) on the shared data: DICOM load, preprocessing + postprocessing, model forward time and peak memory,
on the CPU and, when one is present, on a CUDA GPU.

Each plugin runs in its own process so its peak memory (max RSS; on CUDA also the peak allocated GPU
memory) is its own. Model forward time is the summed wall time of the plugin's torch network forward
calls (hooks) or ONNX Runtime session calls, so "pre/post" is everything else `run` does (resampling,
windowing, sliding-window bookkeeping, mapping results back). Random weights give meaningless findings, but
the same computation.

Backends: "torch", and on a CPU "auto" (the plugins' default: the first load exports the weights to ONNX,
checks ONNX Runtime against torch and runs ONNX Runtime when they agree; the export's seconds and the parity
difference are reported). On a GPU "auto" is torch with autocast, so only "torch" runs there.

Peers for scale (published, GPU): the chest-CT triage project reports ~10 s per study end to end; a
SwinUNETR over a whole chest CT should be well under that on an H100.

Usage
    .venv/bin/python bench/models.py [--plugins a,b] [--device cpu|cuda|both] [--backends torch,auto]
                                     [--ct-slices N] [--repeat 2] [--json FILE]

`--ct-slices N` resamples the CT (64 slices) linearly along z to N slices over the same extent before the
CT plugins run (e.g. 300: the slice count of a thin-slice chest CT), so the sliding window and the triage
network see a volume of that size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def data_root() -> Path:
    root = os.environ.get("RADNODE_TEST_DATA")
    return Path(root) if root else REPO.parent / "shared" / "data"


# --- full-size random weights per plugin ---------------------------------------------------------------


def _pneumonia(folder: Path) -> Path:
    from plugins.cxr_pneumonia import MANIFEST
    from plugins.cxr_pneumonia.model import create_model, read_config
    from plugins.torch_common import save_weights

    return save_weights(create_model(read_config(MANIFEST.config)), folder / MANIFEST.weights)


def _foundation(folder: Path) -> Path:
    import torch

    from plugins.cxr_foundation import MANIFEST
    from plugins.cxr_foundation.heads import Heads, save_heads
    from plugins.cxr_foundation.model import build_backbone, read_config
    from plugins.registry import sha256_file
    from plugins.torch_common import save_weights

    config = read_config(MANIFEST, None)
    backbone = build_backbone(config)
    weights = save_weights(backbone, folder / MANIFEST.weights)
    heads = Heads(int(backbone.embed_dim), len(config.findings))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.02)
    save_heads(folder / config.heads_file, heads.state_dict(), config.findings,
               meta={"backbone_sha256": sha256_file(weights)})
    del backbone
    return weights


def _triage(folder: Path) -> Path:
    from plugins.ct_chest_triage import MANIFEST
    from plugins.ct_chest_triage.model import build_network, parse_config
    from plugins.torch_common import save_weights

    return save_weights(build_network(parse_config(MANIFEST.config)), folder / MANIFEST.weights)


def _organ(folder: Path) -> Path:
    from plugins.ct_organ_seg import MANIFEST
    from plugins.ct_organ_seg.model import network_for
    from plugins.torch_common import save_weights

    return save_weights(network_for(MANIFEST.config), folder / MANIFEST.weights)


def _prostate(folder: Path) -> Path:
    from plugins.torch_common import save_weights
    from plugins.us_prostate_seg import MANIFEST
    from plugins.us_prostate_seg.model import network

    return save_weights(network(MANIFEST.config), folder / MANIFEST.weights)


CT = "ct_chest_philips_lungdx_a0001"
CASES: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    # plugin -> (weights writer, input files relative to the shared data root; a folder = all its *.dcm)
    "cxr-pneumonia": (_pneumonia, ["cxr_nema_wg04_rg1/RG1_UNCR.dcm"]),
    "cxr-foundation": (_foundation, ["cxr_nema_wg04_rg1/RG1_UNCR.dcm"]),
    "ct-chest-triage": (_triage, [CT]),
    "ct-organ-seg": (_organ, [CT]),
    "us-prostate-seg": (_prostate, ["us_samples_pydicom/examples_ybr_color.dcm"]),
}


# --- one plugin in this process --------------------------------------------------------------------------


def _networks(plugin: Any) -> list[Any]:
    import torch

    return [v for v in vars(plugin).values() if isinstance(v, torch.nn.Module)]


class _TimedOnnx:
    """An OnnxModel whose calls add their wall time to `forward` (the bench's forward figure for ONNX Runtime)."""

    def __init__(self, model: Any, forward: list[float]) -> None:
        self.model, self.forward = model, forward

    def __call__(self, *arrays: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.model(*arrays)
        finally:
            self.forward.append(time.perf_counter() - t)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def resample_slices(image: Any, slices: int) -> Any:
    """A CT volume resampled linearly along z to `slices` slices over the same extent (spacing adjusted; each
    new slice keeps the source reference of its nearest original)."""
    from dataclasses import replace

    import numpy as np
    from scipy.ndimage import zoom

    z = image.pixels.shape[0]
    if image.kind != "volume" or slices == z or z < 2 or slices < 2:
        return image
    pixels = zoom(image.pixels, (slices / z, 1, 1), order=1).astype(np.float32)
    spacing = (float(image.spacing[0]) * (z - 1) / (slices - 1), *image.spacing[1:])
    sources = tuple(image.sources[min(z - 1, round(i * (z - 1) / (slices - 1)))] for i in range(slices))
    return replace(image, pixels=pixels, spacing=spacing, sources=sources)


def run_one(name: str, device: str, repeat: int, backend: str = "torch", ct_slices: int = 0) -> dict[str, Any]:
    """Generate weights, load with `backend` ("torch", or "auto": export, parity check, ONNX Runtime on a CPU),
    run `repeat` times; the figures of this process."""
    import torch

    from node.imaging import load_image
    from plugins.registry import build, discover
    from plugins.torch_common import AUTO_REPORT_FILE

    manifest = discover().manifests[name]
    writer, inputs = CASES[name]
    files: list[Path] = []
    for rel in inputs:
        p = data_root() / rel
        files += sorted(p.glob("*.dcm")) if p.is_dir() else [p]
    with tempfile.TemporaryDirectory(prefix="radnode-bench-models-") as tmp:
        t = time.perf_counter()
        weights = writer(Path(tmp) / name)
        generate = time.perf_counter() - t
        plugin = build(manifest)
        plugin.backend_override = "torch" if backend == "torch" else None
        t = time.perf_counter()
        plugin.load(device, weights)
        load_s = time.perf_counter() - t
        params = sum(p.numel() for net in _networks(plugin) for p in net.parameters())  # torch before auto settles
        parity: dict[str, Any] = {}
        if backend == "auto":
            t = time.perf_counter()
            plugin.settle_backend(weights)
            parity = json.loads((weights.parent / AUTO_REPORT_FILE).read_text())
            parity["settle_s"] = time.perf_counter() - t
    forward: list[float] = []
    started: list[float] = []
    if plugin.onnx is not None:
        plugin.onnx = _TimedOnnx(plugin.onnx, forward)

    def pre(*_: Any) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started.append(time.perf_counter())

    def post(*_: Any) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        forward.append(time.perf_counter() - started.pop())

    for net in _networks(plugin):
        net.register_forward_pre_hook(pre)
        net.register_forward_hook(post)
    runs = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        image = load_image(files, min_slices=manifest.series.min_slices)
        dicom = time.perf_counter() - t
        if ct_slices:
            image = resample_slices(image, ct_slices)
        forward.clear()
        t = time.perf_counter()
        findings = plugin.run(image)
        total = time.perf_counter() - t
        runs.append({"dicom_load": dicom, "run": total, "forward": sum(forward), "pre_post": total - sum(forward),
                     "forward_calls": len(forward), "not_applicable": findings.not_applicable})
    result: dict[str, Any] = {
        "plugin": name, "device": device, "backend": plugin.backend, "parity": parity,
        "parameters": params, "generate_weights_s": generate, "load_s": load_s,
        "input": f"{len(files)} file(s), {tuple(image.pixels.shape)}",
        "runs": runs,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.startswith("cuda"):
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 1024**2
        result["gpu"] = torch.cuda.get_device_name()
    return result


# --- driver ----------------------------------------------------------------------------------------------


def render(results: list[dict[str, Any]]) -> str:
    head = f"{'plugin':<17}{'device':<7}{'backend':<8}{'params':>9}{'DICOM':>8}{'pre/post':>10}{'forward':>9}" \
           f"{'run':>8}{'peak RSS':>10}{'GPU peak':>10}  input"
    lines = ["seconds: median over runs after the first (the first run includes warm-up)", "", head]
    runs_of: dict[tuple[str, str, str], float] = {}
    for r in results:
        if "error" in r:
            lines.append(f"{r['plugin']:<17}{r['device']:<7}{r.get('backend', ''):<8}  failed: {r['error']}")
            continue
        runs = r["runs"][1:] or r["runs"]

        def med(key: str, runs: list = runs) -> float:
            return statistics.median(x[key] for x in runs)

        runs_of[(r["plugin"], r["device"], r["backend"])] = med("run")
        gpu = f"{r['gpu_peak_mb']:>8.0f}MB" if "gpu_peak_mb" in r else f"{'-':>10}"
        lines.append(f"{r['plugin']:<17}{r['device']:<7}{r['backend']:<8}{r['parameters'] / 1e6:>8.1f}M"
                     f"{med('dicom_load'):>8.2f}{med('pre_post'):>10.2f}{med('forward'):>9.2f}{med('run'):>8.2f}"
                     f"{r['max_rss_mb']:>8.0f}MB{gpu}  {r['input']}")
    parities = [r for r in results if r.get("parity")]
    if parities:
        lines += ["", "backend auto on the CPU: the first load's export and parity check, and the run against torch",
                  f"{'plugin':<17}{'export+check':>13}{'max abs diff':>14}{'verdict':>9}{'run torch/auto':>16}"]
        for r in parities:
            v = r["parity"]
            torch_run = runs_of.get((r["plugin"], r["device"], "torch"))
            auto_run = runs_of.get((r["plugin"], r["device"], r["backend"]))
            ratio = f"{torch_run / auto_run:>15.2f}x" if torch_run and auto_run else f"{'-':>16}"
            lines.append(f"{r['plugin']:<17}{v['settle_s']:>12.1f}s{v['max_abs_diff']:>14.2g}"
                         f"{'passed' if v['passed'] else 'failed':>9}{ratio}")
    lines += ["", "peer (published): chest-CT triage ~10 s per study end to end on a GPU"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plugins", default=",".join(CASES))
    p.add_argument("--device", choices=["cpu", "cuda", "both"], default="both")
    p.add_argument("--backends", default="torch,auto", help="torch, auto (CPU only: GPU auto is torch)")
    p.add_argument("--ct-slices", type=int, default=0, help="resample the CT to this many slices (0: as stored)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: NAME:DEVICE:BACKEND
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        name, device, backend = args.one.split(":", 2)
        print(json.dumps(run_one(name, device, args.repeat, backend, args.ct_slices)))
        return 0
    devices = ["cpu"]
    if args.device in ("cuda", "both"):
        import torch

        if torch.cuda.is_available():
            devices = ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
        elif args.device == "cuda":
            print("no CUDA device here", file=sys.stderr)
            return 1
    backends = [b for b in args.backends.split(",") if b]
    results = []
    for name in [n for n in args.plugins.split(",") if n]:
        for device in devices:
            for backend in backends if device == "cpu" else ["torch"]:
                print(f"{name} on {device} ({backend}) ...", flush=True)
                done = subprocess.run([sys.executable, __file__, "--one", f"{name}:{device}:{backend}",
                                       "--repeat", str(args.repeat), "--ct-slices", str(args.ct_slices)],
                                      capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if done.returncode != 0:
                    results.append({"plugin": name, "device": device, "backend": backend,
                                    "error": done.stderr.strip().splitlines()[-1:]})
                    continue
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
