# The set-up commands of the README. Each creates the virtual environment on first use, and
# re-installs the package when pyproject.toml changes (its entry points: the radfl commands).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.radfl-installed

.PHONY: simulate test lint install

simulate: $(STAMP)
	$(BIN)/radfl simulate $(ARGS)

# Two workers (pytest-xdist): an end-to-end test spends much of its time waiting on process
# start-up, so a second one fills the idle core. A module runs whole on one worker (its shared
# simulation fixture once); modules with slow tests are handed out first (tests/conftest.py),
# in that order. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check common client server simulations tests
	$(BIN)/mypy

install: $(STAMP)

# torch first, pinned: 2.13.0 is the CPU wheel; a looser request pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)
