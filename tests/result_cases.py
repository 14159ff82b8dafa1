"""Representative radnode outputs for the external-validator tests: three cases run through the project's own
offline path (`node.pipeline.offline.infer_series`, what `radnode infer` runs), each writing SEG/SR/SC, arrays.npz and
findings.json into a folder.

- `ct_case`: lung-quant (classical, no weights) on the shared 64-slice chest CT -> SEG, SR, SC;
- `cxr_case`: cxr-pneumonia with a tiny generated ViT (as tests/test_cxr_pneumonia.py) on the NEMA CR -> SR, SC;
- `us_case`: us-prostate-seg with tiny generated weights and the bright-disc stand-in network of
  tests/test_us_prostate_seg.py on the calibrated 2-frame Philips US (RLE, palette colour), with bright discs
  painted on both frames so the mask is non-empty and the SR carries per-frame areas -> SEG, SR, SC.

Use the fixtures (session-scoped: each case runs once per session), or `run_case` directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.dicom.files import group_series
from node.pipeline.offline import SeriesRun, infer_series
from node.settings import Settings
from plugins.base import Image, Manifest

CT_SERIES = "ct_chest_philips_lungdx_a0001"  # Philips, 64 axial slices 512x512
CXR_FILE = "cxr_nema_wg04_rg1/RG1_UNCR.dcm"  # CR, MONOCHROME1, uncompressed
US_FILE = "us_samples_pydicom/OBXXXX1A_rle_2frame.dcm"  # Philips, 2 frames 600x800, RLE palette colour, calibrated
US_DISCS = {0: ((250, 420), 40), 1: ((260, 440), 55)}  # frame index -> centre (row, col), radius: in the scan area
CXR_TINY = {"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
US_TINY = {"encoder": "resnet18", "fpn_channels": 16, "size": 128}
US_BRIGHT = 230.0  # the stand-in network's decision level (tests/test_us_prostate_seg.py BRIGHT)


@dataclass
class Case:
    """One plugin run: the source files, the folder with its outputs, and the run record."""

    name: str
    plugin: str
    sources: list[Path]
    out: Path
    run: SeriesRun

    @property
    def dicom_outputs(self) -> list[Path]:
        return sorted(self.out.glob("*.dcm"))

    @property
    def seg(self) -> Path | None:
        return self.out / "SEG.dcm" if (self.out / "SEG.dcm").is_file() else None

    @property
    def sr(self) -> Path | None:
        return self.out / "SR.dcm" if (self.out / "SR.dcm").is_file() else None

    @property
    def scs(self) -> list[Path]:
        return sorted(self.out.glob("SC-*.dcm"))

    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.out / "arrays.npz") as npz:
            return {k: npz[k] for k in npz.files}

    def findings(self) -> dict:
        return json.loads((self.out / "findings.json").read_text())


def run_case(name: str, manifest: Manifest, sources: list[Path], out: Path, models: Path,
             adapt: Callable[[object], None] = lambda plugin: None) -> Case:
    """Load the plugin as the CLI does (`node.pipeline.inference.load_plugin` with `models` as the models dir), let
    `adapt` change the loaded plugin (a stand-in network), and run `infer_series` on the one series in
    `sources`, writing into `out`. Fails the calling test when the run does not end `encoded`."""
    from node.pipeline.inference import load_plugin

    settings = Settings(data_dir=out.parent / f"{name}-data", models_dir=models)
    plugin, sha = load_plugin(manifest, settings)
    adapt(plugin)
    series, info, skipped = group_series(sources)
    assert len(series) == 1 and not skipped, (name, list(series), skipped)
    ((uid, files),) = series.items()
    run = infer_series(plugin, manifest, settings, files, info[uid], uid, out, sha)
    assert run.state == "encoded", f"{name}: {run.state}: {run.reason}"
    return Case(name, manifest.name, files, out, run)


# --- the three cases ------------------------------------------------------------------------------------------


def make_ct_case(data_root: Path, work: Path) -> Case:
    from plugins.lung_quant import MANIFEST

    sources = sorted((data_root / CT_SERIES).glob("*.dcm"))
    return run_case("ct-lung-quant", MANIFEST, sources, work / "ct-lung-quant", work / "models-none")


def make_cxr_case(data_root: Path, work: Path) -> Case:
    import torch

    from plugins.cxr_pneumonia import MANIFEST
    from plugins.cxr_pneumonia.model import create_model, read_config
    from plugins.torch_common import save_weights

    models = work / "models-cxr"
    folder = models / MANIFEST.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CXR_TINY))
    torch.manual_seed(0)
    save_weights(create_model(read_config({**MANIFEST.config, **CXR_TINY})), folder / MANIFEST.weights)
    return run_case("cxr-pneumonia", MANIFEST, [data_root / CXR_FILE], work / "cxr-pneumonia", models)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def make_us_case(data_root: Path, work: Path) -> Case:
    import torch

    from plugins.torch_common import save_weights
    from plugins.us_prostate_seg import MANIFEST
    from plugins.us_prostate_seg.model import ModelConfig, network

    models = work / "models-us"
    folder = models / MANIFEST.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(US_TINY))
    torch.manual_seed(0)
    save_weights(network(MANIFEST.config | US_TINY), folder / MANIFEST.weights)
    cfg = ModelConfig.model_validate(MANIFEST.config)

    def bright_disc_network(batch: np.ndarray) -> np.ndarray:
        """Stands in for the FPN: probability high where the preprocessed grey level exceeds US_BRIGHT."""
        grey = (batch[:, 0] * cfg.std + cfg.mean) * 255.0
        return (1.0 / (1.0 + np.exp(-(grey - US_BRIGHT) / 4.0))).astype(np.float32)

    def adapt(plugin) -> None:
        run = plugin.run

        def run_with_discs(image: Image):
            """The plugin's own run on the loaded image with bright discs painted on its frames."""
            pixels = image.pixels.copy()
            for k, (centre, radius) in US_DISCS.items():
                pixels[k][_disc(pixels.shape[1:3], centre, radius)] = 255
            return run(replace(image, pixels=pixels))

        plugin.predict = bright_disc_network
        plugin.run = run_with_discs

    # as the default rules route it (BodyPart PROSTATE): the sample itself does not say what it shows
    source = pydicom.dcmread(data_root / US_FILE)
    source.BodyPartExamined = "PROSTATE"
    (work / "us-source").mkdir(parents=True, exist_ok=True)
    source.save_as(work / "us-source" / Path(US_FILE).name)
    return run_case("us-prostate-seg", MANIFEST, [work / "us-source" / Path(US_FILE).name], work / "us-prostate-seg",
                    models, adapt)


MAKERS = {"ct": make_ct_case, "cxr": make_cxr_case, "us": make_us_case}


@pytest.fixture(scope="session")
def result_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("result-cases")


@pytest.fixture(scope="session")
def ct_case(data_root: Path, result_work: Path) -> Case:
    return make_ct_case(data_root, result_work)


@pytest.fixture(scope="session")
def cxr_case(data_root: Path, result_work: Path) -> Case:
    return make_cxr_case(data_root, result_work)


@pytest.fixture(scope="session")
def us_case(data_root: Path, result_work: Path) -> Case:
    return make_us_case(data_root, result_work)


if __name__ == "__main__":  # python -m tests.result_cases OUT_DIR [ct cxr us]: write the cases' outputs there
    import sys
    import time

    from tests.conftest import _data_root

    target = Path(sys.argv[1])
    for key in sys.argv[2:] or list(MAKERS):
        t = time.perf_counter()
        case = MAKERS[key](_data_root(), target)
        print(f"{case.name}: {time.perf_counter() - t:.1f} s -> {case.out}: "
              f"{sorted(p.name for p in case.out.iterdir())}; {case.run.findings and case.run.findings.get('summary')}")
