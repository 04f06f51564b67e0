# Everything starts from a machine with only Python 3.11+: the first target run creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup tools dbt dbt-if-possible demo test lint unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# promtool and prometheus (Debian's prometheus package) for the alerting tests: installed when
# missing and apt-get can (as root); otherwise those tests skip, except in CI where they fail.
tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  echo "prometheus (promtool) is not installed and apt-get cannot install it here;" \
	    "the alerting tests will be skipped." >&2
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

unit: setup tools dbt-if-possible
	$(BIN)/pytest -n 4 --dist loadfile

test: lint unit

bench: setup
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/fleet.py
	$(BIN)/python benchmarks/history.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/budget.py

clean:
	rm -rf $(VENV) $(DBT_VENV) .mypy_cache .pytest_cache .ruff_cache demo.db contacts.db
