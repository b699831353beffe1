# Two commands for a fresh machine with Python 3.11+ and git: `make run` and `make test`.
# Each creates the virtual environment in .venv on first use (and again when
# requirements.txt changes), so nothing needs installing by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean

# The project itself is installed too (editable, its dependencies already pinned above), so
# `zkv` and `import zkv` work from any directory with the venv's Python.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The whole cluster under honcho on http://127.0.0.1:5000; Ctrl-C stops it. The Procfile runs
# the services with $VIRTUAL_ENV's Python: this venv's, even if another one is activated.
run: $(STAMP)
	VIRTUAL_ENV="$(CURDIR)/$(VENV)" $(BIN)/honcho start

# The test suite: unit, integration and process tests.
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The benchmark: its own cluster, Redis and webdis when installed; a table and bench/results/.
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
