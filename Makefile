# Two commands for a fresh Debian machine with Python 3.11: `make serve` and `make test`.
# Both create .venv on first use; `make test` type-checks mailflow/ (mypy) and lints mailflow/, tests/ and
# bench/ (ruff: names and the 120-column line; settings in pyproject.toml) before the tests. `make battery` and `make bench` are for CI and measurements.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
BATTERY ?= ../shared/battery
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (`auto`: one per core; 0 runs the suite in one process)
PYTEST_WORKERS ?= auto

.PHONY: serve test battery bench bench-pinned clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/mailflow serve

test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/ruff check mailflow tests bench
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

battery: $(STAMP)
	BATTERY=$(BATTERY) PYTEST_ARGS="$(PYTEST_ARGS)" PATH=$(abspath $(BIN)):$$PATH scripts/battery.sh

bench: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/run.py

# each server on one core (taskset), load generator and sinks on the other: the cost per message alone
bench-pinned: $(STAMP)
	PINNED=1 PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var build *.egg-info
