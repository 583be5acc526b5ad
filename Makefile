# The two commands: `make demo` and `make test`. Only python3 (3.11+) and pip are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR := var/demo

.PHONY: demo test run lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

## demo: 3 runners and a Celery worker on SQLite + the filesystem broker; kill the leader.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	CLUSTER_VAR_DIR=$(DEMO_DIR) $(BIN)/python manage.py migrate --verbosity 0
	CLUSTER_VAR_DIR=$(DEMO_DIR) $(BIN)/python manage.py demo

## test: the whole suite on the embedded default (SQLite + filesystem broker).
test: $(STAMP)
	$(BIN)/python -m pytest

## run: one long-running node on the embedded default (Ctrl-C hands off and exits).
run: $(STAMP)
	$(BIN)/python manage.py migrate --verbosity 0
	$(BIN)/python manage.py runcluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy cluster_singletons
	$(BIN)/python manage.py makemigrations --check --dry-run

bench: $(STAMP)
	$(BIN)/python -m benchmarks.failover --db sqlite --trials 10
	$(BIN)/python -m benchmarks.failover --db postgres --trials 10

clean:
	rm -rf $(VENV) var
