# z3 — two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

DEMO_ARGS ?=

.PHONY: venv browser demo test test-all test-gpu bench lint clean

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

## Headless Chromium for the tests of the report's pages (Debian's chromium package), installed
## with apt-get where it is missing (as root, or through sudo); Z3_CHROMIUM names another browser.
CHROMIUM ?= $(or $(Z3_CHROMIUM),/usr/bin/chromium)
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi; \
			echo "installing Debian's chromium for the page tests"; \
			export DEBIAN_FRONTEND=noninteractive; \
			$$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
			|| { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
			|| echo "WARNING: could not install chromium: the page tests will be skipped"; \
		else echo "WARNING: no apt-get: install Chromium and set Z3_CHROMIUM to run the page tests"; fi; \
	fi

## Run the test suite (CI runs this): everything but the tests marked slow (kill and resume of
## whole pipelines, minutes each) and gpu (pyproject.toml's addopts deselects both).
test: $(STAMP) browser
	$(PY) -m pytest -q

## Everything a CPU can run, slow tests included (-m replaces the default selection).
test-all: $(STAMP) browser
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
