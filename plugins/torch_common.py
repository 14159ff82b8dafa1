"""Shared by the torch plugins: `TorchPlugin`, the one torch-or-ONNX `load`; the configuration base and its
validation; device and autocast; strict weight loading; ONNX export and the ONNX Runtime backend, and backend
"auto" (ONNX Runtime on a CPU once an export of these weights passed its parity check, torch otherwise). Imports
torch (and onnxruntime) lazily: manifests never import this."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from plugins.base import ONNX_FILE, Manifest, Plugin, WeightsUnavailable, validation_problems

log = logging.getLogger(__name__)

AUTO_ONNX_FILE = "model.auto.onnx"  # in <models dir>/<plugin>/: backend "auto"'s export of the torch weights
AUTO_REPORT_FILE = "model.auto.json"  # its parity verdict and what it was exported from

M = TypeVar("M", bound=BaseModel)


def merged_config(manifest: Manifest, weights: Path | None) -> dict[str, Any]:
    """The manifest's `config` with `<models dir>/<plugin>/config.json` (beside the weights) applied.
    Raises WeightsUnavailable for a bad config.json."""
    return manifest.config_in(weights.parent if weights is not None else None)


def validated_config(model: type[M], config: Mapping[str, Any], what: str) -> M:
    """The merged configuration validated by `model`. Raises WeightsUnavailable naming `what` and each bad key
    (a bad config.json makes the model unusable, never the node)."""
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise WeightsUnavailable(f"{what} configuration is invalid: {validation_problems(exc, 'config')}") from exc


def torch_device(device: str) -> Any:
    """torch.device for "cpu", "cuda", "cuda:N" (or "mps"); CUDA asked for but absent falls back to CPU."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(device)


@contextlib.contextmanager
def autocast(device: Any, enabled: bool = True) -> Iterator[None]:
    """Inference context: no_grad, and on CUDA mixed precision (bf16 where supported, else fp16)."""
    import torch

    with torch.inference_mode():
        if enabled and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield


def load_weights(module: Any, path: Path | None, prefix: str = "") -> Any:
    """Load a safetensors state dict strictly into `module` (keys under `prefix` when given) and return
    the module in eval mode. Raises WeightsUnavailable naming missing, unexpected or mis-shaped tensors."""
    if path is None or not path.is_file():
        raise WeightsUnavailable(f"weights file {path} not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsUnavailable(f"{path}: not a safetensors file ({exc})") from exc
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(tensors[k].shape)} where the "
                        f"architecture has {tuple(expected[k].shape)})")
    if problems:
        raise WeightsUnavailable(f"{path.name} does not fit the configured architecture: {'; '.join(problems)}")
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def save_weights(module: Any, path: Path, prefix: str = "") -> Path:
    """Write `module`'s state dict as safetensors (tests and tools generate weights this way)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return path


# --- ONNX Runtime backend -------------------------------------------------------------------------------


_EXPORTED: contextvars.ContextVar[list[tuple[Any, tuple[Any, ...]]] | None] = contextvars.ContextVar(
    "radnode_onnx_exported", default=None)  # while backend auto settles: the (module, example) each export took


def export_onnx(module: Any, example: Sequence[Any], path: Path, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Export an eval-mode module to ONNX (opset 17) at `path`. Raises RuntimeError from the exporter."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    seen = _EXPORTED.get()
    if seen is not None:
        seen.append((module, tuple(example)))
    with torch.inference_mode():
        torch.onnx.export(module, tuple(example), str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dict(dynamic_axes or {}), opset_version=17,
                          dynamo=False)
    return path


class OnnxModel:
    """An ONNX Runtime session with a torch-module-like call: numpy arrays in, numpy arrays out."""

    def __init__(self, path: Path, device: Any) -> None:
        if not path.is_file():
            raise WeightsUnavailable(f"ONNX model {path} not found: run `radnode export-onnx` first")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise WeightsUnavailable(f"backend onnx needs onnxruntime ({exc})") from exc

        providers = ["CPUExecutionProvider"]
        if getattr(device, "type", "cpu") == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise WeightsUnavailable(f"{path}: not a usable ONNX model ({type(exc).__name__}: {exc})") from exc
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in zip(self.inputs, arrays, strict=True)}
        return self.session.run(None, feed)


# --- the plugin base -------------------------------------------------------------------------------------


class TorchConfig(BaseModel):
    """Base of a torch plugin's configuration (the manifest's `config` with config.json applied): frozen,
    unknown keys refused, and the backend that runs the network."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # "auto": ONNX Runtime on a CPU when an export of these weights passed the parity check (TorchPlugin.settle_backend
    # writes it on the first load), torch on a GPU and otherwise; "torch"; "onnx": model.onnx from `radnode export-onnx`
    backend: Literal["auto", "torch", "onnx"]


def _low_high(window: tuple[float, float]) -> tuple[float, float]:
    if not window[0] < window[1]:
        raise ValueError(f"hu_window must be [low, high] with low < high, got {list(window)}")
    return window


HuWindow = Annotated[tuple[float, float], AfterValidator(_low_high)]  # HU mapped to [0, 1] by a CT plugin

C = TypeVar("C", bound=TorchConfig)


class TorchPlugin(Plugin, Generic[C]):
    """A plugin whose network runs in torch (safetensors weights, strict loading) or in ONNX Runtime, as its
    configuration's `backend` says: "onnx" runs model.onnx beside the weights (`radnode export-onnx`); "auto" (the
    default) runs model.auto.onnx on a CPU when `settle_backend` exported it from these very weights and
    configuration, ONNX Runtime's outputs matched torch's (`onnx_tolerance`) and it ran at least as fast
    (`onnx_min_speedup`); torch otherwise.

    A subclass names its configuration model (`config_model`), builds its untrained network (`new_network`)
    and may check an ONNX model against the configuration (`check_onnx`) or add checks to the configuration
    (`read_config`). After `load`: `config`, `device`, and `net` (torch) or `onnx` (ONNX Runtime, from
    `onnx_file`)."""

    config_model: ClassVar[type[TorchConfig]]
    weights_name: ClassVar[str] = "weights file"  # how the "not found" error names the torch weights
    # backend "auto": the largest absolute difference between ONNX Runtime's and torch's outputs (float32) on the
    # export's sample input that still counts as the same model, and how much faster than torch ONNX Runtime must
    # run the exported network on that input to be chosen (1.0: at least as fast)
    onnx_tolerance: ClassVar[float] = 1e-3
    onnx_min_speedup: ClassVar[float] = 1.0

    config: C
    device: Any = None  # torch.device, set by load
    net: Any = None  # the torch network
    onnx: OnnxModel | None = None  # the ONNX Runtime session
    onnx_file: Path | None = None  # the ONNX model `onnx` runs
    backend_override: str | None = None  # "torch" or "onnx" in place of the configuration's (export tools)

    @property
    def loaded(self) -> bool:
        """Whether a network is loaded (by either backend)."""
        return self.net is not None or self.onnx is not None

    @property
    def backend(self) -> str:
        """The backend in use after `load`: "torch" or "onnx"."""
        return "onnx" if self.onnx is not None else "torch"

    def load(self, device: str, weights: Path | None) -> None:
        """Validate the configuration, then load the network onto `device`: torch builds it and loads `weights`
        (safetensors) strictly; ONNX Runtime opens model.onnx beside them (backend "onnx"), or model.auto.onnx
        (backend "auto" on a CPU, when its parity verdict fits these weights), and checks it against the
        configuration. Raises WeightsUnavailable: an invalid config.json, no weights path (so no models folder),
        a missing or unusable file, weights or an ONNX model that do not fit the configuration."""
        self.net = self.onnx = self.onnx_file = None
        self.config = self.read_config(weights)
        self.device = torch_device(device)
        if weights is None:
            raise WeightsUnavailable(f"{self.manifest.name}: weights not found (no weights path given, so no "
                                     "models folder)")
        backend = self.backend_override or self.config.backend
        if backend == "auto":
            on_cpu = self.device.type == "cpu"
            backend = "onnx" if on_cpu and auto_verdict(self.manifest, weights.parent).get("passed") else "torch"
            path = weights.parent / AUTO_ONNX_FILE
        else:
            path = weights.parent / ONNX_FILE
        if backend == "onnx":
            onnx = OnnxModel(path, self.device)
            self.onnx_file = path
            self.check_onnx(onnx, path)
            self.onnx = onnx
        elif not weights.is_file():  # before building the network: a large one takes seconds to initialise
            raise WeightsUnavailable(f"{self.weights_name} {weights} not found")
        else:
            self.net = load_weights(self.new_network(), weights).to(self.device)

    def settle_backend(self, weights: Path) -> None:
        """Backend "auto" on a CPU, loaded in torch because no export of these weights has a verdict yet: export
        it (`export_onnx`) to model.auto.onnx beside the weights, compare ONNX Runtime's outputs with torch's
        (`onnx_tolerance`) and their speed on the export's input (`onnx_min_speedup`), record the verdict in
        model.auto.json and, when both passed, load again in ONNX Runtime. Once per weights and configuration;
        a failed verdict keeps torch without trying again. An export that cannot be written or fails keeps torch
        (logged); the plugin stays usable either way."""
        if ((self.backend_override or self.config.backend) != "auto" or self.device.type != "cpu"
                or self.net is None or auto_verdict(self.manifest, weights.parent)):
            return
        folder = weights.parent
        target, report_path = folder / AUTO_ONNX_FILE, folder / AUTO_REPORT_FILE
        tmp = folder / f".{AUTO_ONNX_FILE}.{os.getpid()}.tmp"
        started = time.perf_counter()
        seen: list[tuple[Any, tuple[Any, ...]]] = []
        token = _EXPORTED.set(seen)
        try:
            report = self.export_onnx(tmp)
            diff = float(report["max_abs_diff"])
            speed = _speeds(seen[-1], tmp, self.device) if seen and diff <= self.onnx_tolerance else {}
        except Exception as exc:  # exporter, ONNX Runtime, I/O: whatever fails, the plugin keeps torch and runs
            tmp.unlink(missing_ok=True)
            log.warning("%s: backend auto keeps torch: the ONNX export failed (%s: %s)", self.manifest.name,
                        type(exc).__name__, exc)
            return
        finally:
            _EXPORTED.reset(token)
        speedup = speed["torch_seconds"] / max(speed["onnx_seconds"], 1e-9) if speed else 0.0
        verdict = {"fingerprint": auto_fingerprint(self.manifest, folder),
                   "passed": diff <= self.onnx_tolerance and speedup >= self.onnx_min_speedup,
                   "max_abs_diff": diff, "tolerance": self.onnx_tolerance,
                   **{k: round(v, 6) for k, v in speed.items()}, "speedup": round(speedup, 3),
                   "min_speedup": self.onnx_min_speedup, "export_seconds": round(time.perf_counter() - started, 2),
                   "versions": _versions()}
        try:
            if verdict["passed"]:
                os.replace(tmp, target)
            report_tmp = folder / f".{AUTO_REPORT_FILE}.{os.getpid()}.tmp"
            report_tmp.write_text(json.dumps(verdict, indent=1))
            os.replace(report_tmp, report_path)
        except OSError as exc:
            log.warning("%s: backend auto keeps torch: the ONNX export could not be kept (%s)", self.manifest.name,
                        exc)
            return
        finally:
            tmp.unlink(missing_ok=True)
        if diff > self.onnx_tolerance:
            log.warning("%s: backend auto keeps torch: ONNX Runtime differs from torch by %.3g (> %.3g)",
                        self.manifest.name, diff, self.onnx_tolerance)
            return
        if not verdict["passed"]:
            log.info("%s: backend auto keeps torch: ONNX Runtime is %.2fx torch's speed on this machine (below "
                     "%.2fx)", self.manifest.name, speedup, self.onnx_min_speedup)
            return
        log.info("%s: backend auto: exported to %s in %.1f s (max abs difference %.3g, %.2fx torch's speed); "
                 "running ONNX Runtime", self.manifest.name, target.name, verdict["export_seconds"], diff, speedup)
        self.load(str(self.device), weights)

    def read_config(self, weights: Path | None) -> C:
        """The merged configuration (config.json beside `weights`) validated by `config_model`. Raises
        WeightsUnavailable naming the bad keys."""
        merged = merged_config(self.manifest, weights)
        return validated_config(self.config_model, merged, self.manifest.name)  # type: ignore[return-value]

    @abstractmethod
    def new_network(self) -> Any:
        """The untrained torch network of `self.config` (load_weights fills it). Raises WeightsUnavailable when
        the configuration names an architecture that cannot be built."""

    def check_onnx(self, onnx: OnnxModel, path: Path) -> None:
        """Raise WeightsUnavailable when the ONNX model at `path` does not fit `self.config` (default: no check)."""


def auto_fingerprint(manifest: Manifest, folder: Path) -> str:
    """What backend auto's export depends on: the SHA-256 of every model file in `folder` and the configuration
    in force (less backend)."""
    config = {k: v for k, v in manifest.config_in(folder).items() if k != "backend"}
    files = {role: _file_sha256(path) if path.is_file() else None
             for role, path in manifest.files(folder, {**config, "backend": "torch"})}
    blob = json.dumps({"files": files, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def auto_verdict(manifest: Manifest, folder: Path) -> dict[str, Any]:
    """model.auto.json in `folder` when it was written for the model files and configuration there now (and,
    when it passed, model.auto.onnx is there); {} otherwise (no CPU load has settled the backend yet). Raises
    WeightsUnavailable for a bad config.json."""
    try:
        verdict = json.loads((folder / AUTO_REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(verdict, dict) or verdict.get("fingerprint") != auto_fingerprint(manifest, folder):
        return {}
    if verdict.get("passed") and not (folder / AUTO_ONNX_FILE).is_file():
        return {}
    return verdict


def _speeds(exported: tuple[Any, tuple[Any, ...]], path: Path, device: Any, runs: int = 2) -> dict[str, float]:
    """Seconds of the exported module in torch and of its export in ONNX Runtime on the export's example (the
    best of `runs` after a warm-up run each)."""
    import torch

    module, example = exported
    onnx = OnnxModel(path, device)
    arrays = [t.detach().float().cpu().numpy() for t in example]

    def best(call: Any) -> float:
        call()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        torch_seconds = best(lambda: module(*example))
    return {"torch_seconds": torch_seconds, "onnx_seconds": best(lambda: onnx(*arrays))}


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256: a large backbone is hashed once


def _file_sha256(path: Path) -> str:
    from plugins.registry import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = sha256_file(path)
    return _SHA256[key]
