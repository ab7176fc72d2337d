# Two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: install demo test lint format bench sync clean

$(BIN)/aries: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/aries

demo: install
	$(BIN)/aries demo

test: install
	$(BIN)/ruff check aries_assets aries_assets_tests benchmarks
	$(BIN)/ruff format --check aries_assets aries_assets_tests benchmarks
	$(BIN)/pytest -n 2 --dist loadfile

sync: install
	$(BIN)/aries sync

bench: install
	$(BIN)/python benchmarks/sync_benchmark.py

lint: install
	$(BIN)/ruff check aries_assets aries_assets_tests benchmarks

format: install
	$(BIN)/ruff format aries_assets aries_assets_tests benchmarks
	$(BIN)/ruff check --fix aries_assets aries_assets_tests benchmarks

clean:
	rm -rf .dagster .aries
