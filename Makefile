# Two commands for a newcomer (see README):
#   make repro   set up .venv and run the whole pipeline (dvc repro) with the default params
#   make test    set up .venv and run the test suite
# Both are idempotent: the virtual environment is created and filled once, then reused.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Stage commands call `python -m ...`: make sure that is the project's interpreter.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-fast lint clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolution could pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

# The edit loop: the unit tier (tests/unit) without its slow tests; `make test` runs every tier.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
