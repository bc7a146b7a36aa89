# The two entry points of README.md: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_SCENARIO ?= mofed_lifecycle/sim/examples/upgrade-50vf-eth.toml

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

## Run the driver lifecycle on the bundled simulated node (50 VFs, driver upgrade), print its timeline.
demo: $(BIN)/.installed
	@mkdir -p reports
	$(BIN)/mofed-lifecycle sim run $(DEMO_SCENARIO) --report reports/demo.json

## Lint (ruff, mypy) and run the test suite.
test: $(BIN)/.installed lint
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check mofed_lifecycle tests scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) reports .pytest_cache .ruff_cache *.egg-info
