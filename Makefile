# Two commands for a newcomer: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# pip resolves torch==2.14.1 / torchvision==0.29.1 from the machine's local wheels. The venv takes about 7 GB
# (torch's CUDA build); --no-cache-dir keeps pip from storing a second copy of every download.
PIP    := $(BIN)/python -m pip --disable-pip-version-check --no-cache-dir

.PHONY: demo test lint install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-lint: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[test,lint]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/ltsweep demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint rules and formatting), the import layers of docs/architecture.md (import-linter) and mypy
lint: $(VENV)/.installed-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(VENV)/.installed-test
	for b in benchmarks/bench_*.py; do \
		echo "== $$b"; smoke=""; \
		if [ $$b = benchmarks/bench_gpu.py ] && ! command -v nvidia-smi >/dev/null; then smoke=--cpu-smoke; fi; \
		$(BIN)/python $$b $$smoke || exit 1; \
	done

clean:
	rm -rf data results runs .pytest_cache
