# Everything starts from a machine with only Python 3.11+: the first target run creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/contacts-sync demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy sync

unit: setup
	$(BIN)/pytest -n 2 --dist loadfile

test: lint unit

bench: setup
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/budget.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache demo.db contacts.db
