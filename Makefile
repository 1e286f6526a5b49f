# The set-up commands of the README. Each creates the virtual environment on first use, and
# re-installs the package when pyproject.toml changes (its entry points: the radfl commands).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.radfl-installed

.PHONY: simulate test lint install

simulate: $(STAMP)
	$(BIN)/radfl simulate $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

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
