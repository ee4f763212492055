#!/usr/bin/env bash
# The GPU check of issue 11 on one GPU, every step under its own time limit (about 5 minutes in all,
# 8.6 minutes at most). Run from the repository root:
#     bash benchmarks/gpu_check.sh [OUT]          # OUT defaults to $OUT, else /tmp/gpu_check
# Writes OUT/gpu_suite.md (one table of ratios against timm, same run), OUT/gpu_suite.json,
# OUT/parts/*.json (one per section, written row by row) and OUT/logs/<step>.log.
# Needs PyTorch (CUDA) and timm only; pytest is used for the CUDA unit test when it is installed.
# A dry run of the mechanics on a CPU: GPU_CHECK_ARGS="--quick --device cpu" bash benchmarks/gpu_check.sh
set -u
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT/logs"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
read -r -a EXTRA <<<"${GPU_CHECK_ARGS:-}"
SUITE=(python benchmarks/gpu_suite.py --out "$OUT" "${EXTRA[@]}")
T0=$(date +%s)

source "$(dirname "$0")/gpu_steps.sh"

step env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import torch, timm; print(torch.__version__, torch.version.cuda, timm.__version__, torch.cuda.get_device_name())";
  command -v gcc cc || echo "no C compiler: inductor/Triton cannot build kernels (compiled rows will fail)"'
step numerics 35 "${SUITE[@]}" --only numerics
if python -c "import pytest" 2>/dev/null; then
  step pytest-cuda 35 python -m pytest -q -p no:cacheprovider tests/model/test_fast_paths.py -k cuda
fi
step vits 50 "${SUITE[@]}" --only vits
step vitg 50 "${SUITE[@]}" --only vitg
step ssl 50 "${SUITE[@]}" --only ssl
step loader 50 "${SUITE[@]}" --only loader
# compiled: training shapes only (3 graphs), PLUTO-4G with the attention backend that was faster eager
step vits-compiled 130 "${SUITE[@]}" --only vits --compile --modes fwd+bwd
BEST=$(python -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows']
print(max(rows, key=lambda r: r.get('ours_img_s', 0))['attention'])" "$OUT/parts/vitg.json" 2>/dev/null || echo auto)
step vitg-compiled 80 "${SUITE[@]}" --only vitg --compile --attention "$BEST"
step table 15 "${SUITE[@]}" --table
cat "$OUT/gpu_suite.md"
echo "total $(($(date +%s) - T0)) s; logs in $OUT/logs"
