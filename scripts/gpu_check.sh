#!/usr/bin/env bash
# The GPU timings of issue 19 as one command on a GPU machine lent by the `device` tool (an NVIDIA H200 whose
# python3 holds PyTorch, ONNX Runtime, timm, safetensors and scipy; nothing can be fetched there).
#
#   here, once:  bash scripts/gpu_check.sh --prepare
#                (the wheels that image lacks -> .whl/, the bench inputs from the shared data -> .gpu-data/;
#                 both git-ignored through .git/info/exclude, about 45 MB together)
#   there:       device run: command "bash scripts/gpu_check.sh", carry [".whl", ".gpu-data"], timeout_s 540
#
# It prints the GPU, then bench/models.py on CUDA (bf16 autocast) for the five seed plugins at full size with
# generated weights: per-plugin forward time and peak GPU memory; then the CT plugins again on the chest CT
# resampled to 300 slices (SwinUNETR sliding window 96^3, overlap 0.25). Text and JSON land in $OUT.
# bench/e2e.py needs Orthanc and the node's services, which that machine does not have: it is not run there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  for ignored in /.whl/ /.gpu-data/; do
    grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
  done
  rm -rf .whl .gpu-data
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydicom==3.0.2 monai==1.6.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5
  data=${RADNODE_TEST_DATA:-../shared/data}
  mkdir -p .gpu-data/cxr_nema_wg04_rg1 .gpu-data/us_samples_pydicom
  cp -r "$data/ct_chest_philips_lungdx_a0001" .gpu-data/
  cp "$data/cxr_nema_wg04_rg1/RG1_UNCR.dcm" .gpu-data/cxr_nema_wg04_rg1/
  cp "$data/us_samples_pydicom/examples_ybr_color.dcm" .gpu-data/us_samples_pydicom/
  du -sh .whl .gpu-data
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# radnode itself is not installed there: its plugins are found through their entry points, so give them a dist-info
python3 - <<'PYEOF'
import pathlib, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path("/tmp/site/radnode-0.0.0.dist-info")
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: radnode\nVersion: 0.0.0\n")
plugins = project["entry-points"]["radnode.plugins"]
(info / "entry_points.txt").write_text("[radnode.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in plugins.items()))
PYEOF
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 RADNODE_TEST_DATA="$PWD/.gpu-data" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/radnode-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" | tee -a "$out/gpu.txt"
python3 bench/models.py --device cuda --repeat 3 --json "$out/models-cuda.json" | tee "$out/models-cuda.txt"
python3 bench/models.py --device cuda --plugins ct-organ-seg,ct-chest-triage --ct-slices 300 --repeat 3 \
  --json "$out/models-cuda-300.json" | tee "$out/models-cuda-300.txt"
