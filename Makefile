# Everything starts from a machine with only Python 3.11+: the first target run creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup dbt dbt-if-possible demo test lint unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# dbt pins many libraries of its own, so it gets its own virtualenv; only tests/test_dbt.py uses it.
# dbt-core 1.12 needs a parser that downloads a prebuilt binary while installing: kept below it.
DBT_VENV := .venv-dbt
DBT_STAMP := $(DBT_VENV)/.installed

dbt: $(DBT_STAMP)

$(DBT_STAMP):
	$(PYTHON) -m venv $(DBT_VENV)
	$(DBT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		'dbt-core>=1.8,<1.12' 'dbt-postgres>=1.8,<1.12'
	touch $(DBT_STAMP)

# The dbt test is skipped when dbt is missing, so a failed install must not fail the build.
dbt-if-possible:
	@$(MAKE) --no-print-directory dbt || echo "dbt did not install; tests/test_dbt.py will skip."

demo: setup
	$(BIN)/contacts-sync demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy sync

unit: setup dbt-if-possible
	$(BIN)/pytest -n 2 --dist loadfile

test: lint unit

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(DBT_VENV) .mypy_cache .pytest_cache .ruff_cache demo.db contacts.db
