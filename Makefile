# Two commands for a newcomer (see README):
#   make repro   set up .venv and run the whole pipeline (dvc repro) with the default params
#   make test    set up .venv and run the test suite (every tier, side by side on every core)
# Both are idempotent: the virtual environment is created and filled once, then reused.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Stage commands call `python -m ...`: make sure that is the project's interpreter.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-release test-fast lint clean-venv

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

# Every tier (reliability cases included), one xdist worker per core; a module's tests stay on one worker, so
# a module fixture (a sweep, a team server) is built once (a class is a unit of its own: test_faults.py's kill
# cases are two, so they run on both workers; tests/conftest.py orders the units). The release tier (tests/release: the long forms of
# checks this suite runs in a cheap form) is `make test-release`; CI runs both.
# --no-loadscope-reorder: xdist 3.8 otherwise re-sorts the units by their number of tests (its default),
# which ignored tests/conftest.py's order and started the few-test, minutes-long modules last.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadscope --no-loadscope-reorder -m "not release"

test-release: $(STAMP)
	$(BIN)/python -m pytest tests/release

# The edit loop: the unit tier (tests/unit) without its slow tests; `make test` runs every tier.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
