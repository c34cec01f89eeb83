# z3 — two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

DEMO_ARGS ?=

.PHONY: venv demo test test-all test-gpu bench lint clean

# The environment is built from nothing: torch first (a pinned CPU-capable wheel;
# an unpinned `torch` would pull a multi-GB CUDA build), then the project with its test extra.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test]"
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the gpu extra"; $(PIP) install --quiet -e ".[gpu]"; fi
	touch $(STAMP)

venv: $(STAMP)

## Set up and run the whole pipeline on the embedded demo (results/demo/).
demo: $(STAMP)
	$(PY) -m snakemake $(DEMO_ARGS)

## Run the test suite (CI runs this): everything but the tests marked slow (kill and resume of
## whole pipelines, minutes each) and gpu (pyproject.toml's addopts deselects both).
test: $(STAMP)
	$(PY) -m pytest -q

## Everything a CPU can run, slow tests included (-m replaces the default selection).
test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

## GPU tests only (on a machine with a usable CUDA device): cupy tests and torch tests on cuda,
## slow ones included.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m "" -k "cuda or cupy" --ignore=tests/workflow tests

## Benchmarks (JSON lines on stdout).
bench: $(STAMP)
	$(PY) benchmarks/bench_projection.py

## Static checks: ruff check (rules in pyproject.toml), ruff format --check, mypy --strict on z3lib.
lint: $(STAMP)
	$(PIP) install --quiet -e ".[dev]"
	$(VENV)/bin/ruff check z3lib tests benchmarks workflow
	$(VENV)/bin/ruff format --check z3lib tests benchmarks workflow
	$(VENV)/bin/mypy z3lib

clean:
	rm -rf $(VENV) .pytest_cache
