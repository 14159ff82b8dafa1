"""Shared by the torch plugins: `TorchPlugin`, the one torch-or-ONNX `load`; the configuration base and its
validation; device and autocast; strict weight loading; ONNX export and the ONNX Runtime backend. Imports torch
(and onnxruntime) lazily: manifests never import this."""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from plugins.base import ONNX_FILE, Manifest, Plugin, WeightsUnavailable, validation_problems

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


def export_onnx(module: Any, example: Sequence[Any], path: Path, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Export an eval-mode module to ONNX (opset 17) at `path`. Raises RuntimeError from the exporter."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
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

    backend: Literal["torch", "onnx"]


def _low_high(window: tuple[float, float]) -> tuple[float, float]:
    if not window[0] < window[1]:
        raise ValueError(f"hu_window must be [low, high] with low < high, got {list(window)}")
    return window


HuWindow = Annotated[tuple[float, float], AfterValidator(_low_high)]  # HU mapped to [0, 1] by a CT plugin

C = TypeVar("C", bound=TorchConfig)


class TorchPlugin(Plugin, Generic[C]):
    """A plugin whose network runs in torch (safetensors weights, strict loading) or in ONNX Runtime (model.onnx
    beside the weights, written by `radnode export-onnx`), as its configuration's `backend` says.

    A subclass names its configuration model (`config_model`), builds its untrained network (`new_network`)
    and may check an ONNX model against the configuration (`check_onnx`) or add checks to the configuration
    (`read_config`). After `load`: `config`, `device`, and `net` (backend "torch") or `onnx` (backend "onnx")."""

    config_model: ClassVar[type[TorchConfig]]
    weights_name: ClassVar[str] = "weights file"  # how the "not found" error names the torch weights

    config: C
    device: Any = None  # torch.device, set by load
    net: Any = None  # the torch network (backend "torch")
    onnx: OnnxModel | None = None  # the ONNX Runtime session (backend "onnx")

    @property
    def loaded(self) -> bool:
        """Whether a network is loaded (by either backend)."""
        return self.net is not None or self.onnx is not None

    def load(self, device: str, weights: Path | None) -> None:
        """Validate the configuration, then load the network onto `device`: backend "torch" builds it and loads
        `weights` (safetensors) strictly; backend "onnx" opens model.onnx beside them and checks it against the
        configuration. Raises WeightsUnavailable: an invalid config.json, no weights path (so no models folder),
        a missing or unusable file, weights or an ONNX model that do not fit the configuration."""
        self.net = self.onnx = None
        self.config = self.read_config(weights)
        self.device = torch_device(device)
        if weights is None:
            raise WeightsUnavailable(f"{self.manifest.name}: weights not found (no weights path given, so no "
                                     "models folder)")
        if self.config.backend == "onnx":
            path = weights.parent / ONNX_FILE
            onnx = OnnxModel(path, self.device)
            self.check_onnx(onnx, path)
            self.onnx = onnx
        elif not weights.is_file():  # before building the network: a large one takes seconds to initialise
            raise WeightsUnavailable(f"{self.weights_name} {weights} not found")
        else:
            self.net = load_weights(self.new_network(), weights).to(self.device)

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
