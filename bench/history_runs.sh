#!/usr/bin/env bash
# A real history: the smoke study at each given commit of this repository (that commit's code, through PYTHONPATH,
# with this checkout's .venv), each recorded into results/history by this checkout's `transferbench record`.
#     bench/history_runs.sh 5bc1f37 4ca1b5d 1288571 20e46a8 86111ca HEAD && .venv/bin/transferbench trend smoke
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
for c in "$@"; do
  sha=$(git rev-parse "$c")
  tree=$(mktemp -d)/tree
  git worktree add -q --detach "$tree" "$sha"
  start=$(date +%s)
  (cd "$tree" && PYTHONPATH="$tree/src" "$root/.venv/bin/python" -c \
    "import sys; from transferbench.cli import main; sys.exit(main())" study smoke --results "$tree/results" \
    --no-progress > "$tree/study.log" 2>&1) || { echo "$c: smoke failed, see $tree/study.log"; continue; }
  echo "$c: smoke in $(( $(date +%s) - start )) s"
  .venv/bin/transferbench record smoke --results "$tree/results" --commit "$sha"
  git worktree remove --force "$tree"
done
