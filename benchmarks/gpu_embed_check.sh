#!/usr/bin/env bash
# The GPU check of issue 12 (whole-slide embedding throughput) on one GPU, each step under its own
# time limit (about 6 minutes at most). Run from the repository root:
#     bash benchmarks/gpu_embed_check.sh [OUT]      # OUT defaults to $OUT, else /tmp/gpu_embed_check
# The slide libraries (openslide-python, openslide-bin, imagecodecs, webdataset, wids, braceexpand)
# are installed from wheels in .whl/ when they are missing (a machine with no internet: download them
# beforehand with `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ...`).
# Writes OUT/embed_throughput.json and OUT/logs/<step>.log; prints the tables.
# A dry run of the mechanics on a CPU: EMBED_CHECK_ARGS="--device cpu --quick" bash benchmarks/gpu_embed_check.sh
set -u
OUT=${1:-${OUT:-/tmp/gpu_embed_check}}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
read -r -a EXTRA <<<"${EMBED_CHECK_ARGS:---device cuda}"
T0=$(date +%s)

if ! python -c "import openslide, imagecodecs, webdataset, wids" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/logs/wheels.log" 2>&1 || { echo "installing .whl/ failed: see $OUT/logs/wheels.log"; exit 1; }
    export PYTHONPATH=/tmp/site
  else
    echo "openslide/imagecodecs/webdataset/wids missing and no .whl/ folder to install them from"; exit 1
  fi
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

source "$(dirname "$0")/gpu_steps.sh"

# 20,000 tiles of 224 px at 0.5 µm/px: PLUTO-4S (patch 16) model only, embed end to end, the
# TRIDENT-style baseline with the same workers, the stage breakdown, the reader alone and peak RSS.
step embed 330 python benchmarks/embed_throughput.py --models pluto4s --patch-size 16 \
  --work-dir /tmp/embed_bench --json "$OUT/embed_throughput.json" "${EXTRA[@]}"
cat "$OUT/logs/embed.log"
echo "total $(($(date +%s) - T0)) s; logs in $OUT/logs"
