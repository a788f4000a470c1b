#!/usr/bin/env bash
# The prepared GPU check of the packed-training issue, run on a device machine from the repo root, in two calls on
# one warm machine:
#   bash bench/gpu_check.sh smoke   # ~4 min: the packed path on CUDA: tests/test_packed.py's equivalence checks on the
#                                   # GPU (float64, and bf16 autocast with channels_last), the step benchmark at 2
#                                   # copies, harness vs timm's loop at 224 px and at 64 px batch 64
#                                   # (bench/gpu_throughput.py), then a 26-cell study packed
#   bash bench/gpu_check.sh full    # ~8 min (give the call 560 s): every measurement below, side by side on this GPU
# full: packed vs per-cell steps (img/s at 1 and 16 copies, full fine-tuning and a mid-depth suffix) and whole cells
# (cells/s) with pytest-benchmark (bench/test_packed.py, JSON in $OUT); then one domain_gap GPU sub-grid (textures,
# digits, glyphs; lite0, 8 per class, 3 seeds, 100 steps: 117 cells; no domain measures) run per cell (SUB_LIMIT
# s, default 240) and packed (PACKED_LIMIT s, default 150), each with a fresh cache: wall time and cells/s (a run
# stopped at its limit gets the tables of the cells it made); the two compared by the gate (accuracy and speed:
# packed must change neither for the worse); the packed run's tables copied to $OUT/domain_gap_gpu (commit them as
# results/baselines/domain_gap_gpu: `plan --profile gpu` projects its wall time from them) and `plan domain_gap
# --profile gpu` projected from them.
# (The whole `domain_gap --profile gpu` is 349 M training images before early stopping (`transferbench plan`):
# about 10 hours at the packed rates measured so far, not a check; see docs/speed.md.)
# Needs the wheels that machine lacks in .whl/: `bash bench/gpu_wheels.sh` here, then carry .whl.
set -u
mode=${1:-full}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}  # WHEELS=none: a dry run of the plumbing on a machine that has everything (PY=.venv/bin/python
                        # TEST_DEVICE=cpu)
if [ "$WHEELS" != none ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
# The GPU profile cut to lite0 at 8 per class (each field given once: a study refuses an override given twice).
COMMON=(backbones='[{model: tf_efficientnet_lite0, weights: imagenet}]' grid.n_per_class='[8]' train.eval_every=25
        train.min_steps=50)
# Three conditions near, mid and far from ImageNet: without naming them the profile's 24 conditions make 936 cells
SUB=("${COMMON[@]}" targets='[{dataset: textures}, {dataset: digits}, {dataset: glyphs}]' grid.seed='[0,1,2]'
     train.steps=100)

study() {  # study NAME LIMIT EXTRA...: one timed domain_gap GPU run in its own results folder and cache
  local name=$1 limit=$2; shift 2
  local start end rc
  rm -rf "/tmp/results_$name" "/tmp/cache_$name"
  start=$(date +%s%N)
  TRANSFERBENCH_CACHE=/tmp/cache_$name timeout "$limit" $PY -m transferbench.cli study domain_gap --profile gpu \
    --results "/tmp/results_$name" --no-progress --skip-domains "$@" > "$OUT/study_$name.txt" 2>&1
  rc=$?
  end=$(date +%s%N)
  local made
  made=$(ls "/tmp/results_$name/domain_gap/records" 2>/dev/null | wc -l)
  echo "$name: exit $rc after $(( (end - start) / 1000000 )) ms (124: stopped at the limit), $made cell records" \
    | tee -a "$OUT/summary.txt"
  grep -E "cells ->|wall time|^arm|^pixels|^scratch|^transfer|domain measures" "$OUT/study_$name.txt" \
    | tee -a "$OUT/summary.txt"
  if [ ! -f "/tmp/results_$name/domain_gap/runs.csv" ]; then  # stopped at the limit: the tables of the cells it made
    $PY -m transferbench.cli report domain_gap --results "/tmp/results_$name" 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
  fi
}

bench() {  # bench ARGS...: bench/test_packed.py under pytest-benchmark, its JSON kept
  $PY -m pytest bench/test_packed.py -q -m "" -p no:cacheprovider --benchmark-columns=mean,stddev,rounds \
    --benchmark-json="$OUT/bench_packed.json" "$@" 2>&1 | tail -25
  $PY - "$OUT/bench_packed.json" <<'EOF'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    print(f"{b['name']:<28}", {k: v for k, v in b["extra_info"].items()})
EOF
}

if [ "$mode" = smoke ]; then
  TRANSFERBENCH_TEST_DEVICE=${TEST_DEVICE:-cuda} timeout 240 $PY -m pytest tests/test_packed.py -q -p no:cacheprovider \
    -k "equal or moves or trains_each" 2>&1 | tail -15 | tee "$OUT/packed_tests_cuda.txt"
  BENCH_COPIES=2 BENCH_STEPS=3 bench -k test_steps
  timeout 60 $PY bench/gpu_throughput.py 2>&1 | tee "$OUT/throughput.txt"
  study smoke 120 "${COMMON[@]}" 'targets=[{dataset: textures}]' grid.seed='[0,1]' train.steps=40 run.pack=always
  tail -30 "$OUT/study_smoke.txt"
  exit 0
fi
BENCH_COPIES=${BENCH_COPIES:-1,16} bench 2>&1 | tee "$OUT/packed.txt"
study subgrid_per_cell "${SUB_LIMIT:-240}" "${SUB[@]}" run.pack=never
study subgrid_packed "${PACKED_LIMIT:-150}" "${SUB[@]}" run.pack=always
$PY -m transferbench.cli compare /tmp/results_subgrid_per_cell/domain_gap /tmp/results_subgrid_packed/domain_gap \
  > "$OUT/compare_packed_vs_per_cell.txt" 2>&1
echo "gate, packed against per-cell (accuracy and speed): exit $? (0: no regression)" | tee -a "$OUT/summary.txt"
tail -25 "$OUT/compare_packed_vs_per_cell.txt"
rm -rf "$OUT/domain_gap_gpu" && mkdir -p "$OUT/domain_gap_gpu"  # never tables of an earlier run
(cd /tmp/results_subgrid_packed/domain_gap && cp -r ./*.csv ./*.md ./*.html study.resolved.yaml figures \
  "$OUT/domain_gap_gpu/")
$PY -m transferbench.cli plan domain_gap --profile gpu --reference "$OUT/domain_gap_gpu" 2>&1 | tee "$OUT/plan_gpu.txt"
ls -la "$OUT"
