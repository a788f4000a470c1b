# transferbench: `make study STUDY=domain_gap` and `make test` are all a new user needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDY ?= smoke
OVERRIDES ?=
PROFILE ?=

.PHONY: install study report test test-fast test-slow test-float-paths test-all lint bench regress baseline clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev,dask]'
	touch $(STAMP)

install: $(STAMP)

## run a study (skips finished cells); e.g. make study STUDY=domain_gap OVERRIDES="grid.seed=[0,1]"
study: $(STAMP)
	$(VENV)/bin/transferbench study $(STUDY) $(OVERRIDES) $(if $(PROFILE),--profile $(PROFILE))

## rebuild tables, figures and report from the records, without training
report: $(STAMP)
	$(VENV)/bin/transferbench report $(STUDY)

## the test suite: unit, contract, golden, figure and browser tests (end-to-end ones are marked slow, left out)
test: $(STAMP)
	$(PY) -m pytest -q

## the quick loop while editing: the same selection, stopping at the first failure, slowest tests listed
test-fast: $(STAMP)
	$(PY) -m pytest -q -x --durations=5

## the slow end-to-end tests (studies through the CLI, the regression gate's calibration); CI runs them too
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## the test suite again on another float path (oneDNN's and ATen's kernels held to AVX2: other summation orders, as
## another CPU vendor's kernels take): a test whose float comparison holds on one CPU only fails here; CI runs it
FLOAT_PATH ?= ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
test-float-paths: $(STAMP)
	env $(FLOAT_PATH) $(PY) -m pytest -q

## lint (ruff and mypy, settings in pyproject.toml); CI runs it
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

## speed benchmarks (pytest-benchmark), saved as JSON for --benchmark-compare
bench: $(STAMP)
	$(PY) -m pytest bench -q -m "" --benchmark-autosave --benchmark-columns=mean,stddev,rounds

## compare a rerun with its committed baseline (flagged points trained again at fresh seeds); exits 1 on a regression
regress: $(STAMP)
	$(VENV)/bin/transferbench compare results/baselines/$(STUDY) results/$(STUDY) --confirm --no-progress

## refresh the committed baseline from the last run (tables, figures, reports; no records)
baseline:
	mkdir -p results/baselines/$(STUDY)
	cp results/$(STUDY)/*.csv results/$(STUDY)/report.md results/$(STUDY)/report.html \
	   results/$(STUDY)/study.resolved.yaml results/baselines/$(STUDY)/
	rm -rf results/baselines/$(STUDY)/figures && cp -r results/$(STUDY)/figures results/baselines/$(STUDY)/

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
