# Build, check and run RaptorFlow Data. `make help` lists the targets.
#
# Everything Python runs from .venv, which `make venv` creates and fills from
# pyproject.toml; buf runs from tools/buf/node_modules (npm, pinned by its lock).
# Targets that need PostgreSQL use DATABASE_URL when it is set, and otherwise a
# local PostgreSQL 16 under .devdb/ started by tools/embedded_postgres.py.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
BUF_DIR := tools/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf
BUF_STAMP := $(BUF_DIR)/node_modules/.installed
# The directory tools/gen_protos.py owns; proto-check looks only here.
GENERATED := stubs/raptorflow/data/v1
# Directories that do not exist yet are left out, so ruff and mypy do not fail on them.
LINT_PATHS := $(wildcard server stubs tests examples bench tools harness)
TYPED_PATHS := $(wildcard server stubs examples harness)

PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
RAPTORFLOW_LISTEN ?= 127.0.0.1:50051
IMAGE ?= raptorflow-data:dev

# $(call with_database,NAME): prefix that runs a command with DATABASE_URL set.
# An empty DATABASE_URL counts as unset. Each target gets its own database in
# the shared .devdb cluster, so tests never touch what `make run` stored.
ifeq ($(strip $(DATABASE_URL)),)
with_database = $(PY) tools/embedded_postgres.py --database $(1) --
else
with_database =
endif

.PHONY: help venv proto proto-check lint run test bench bench-check soak docker check clean distclean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## Create .venv and install ./stubs and .[dev] in editable mode

# Re-runs only when a pyproject changes; the stamp lives in .venv, so deleting
# .venv starts over.
$(VENV_STAMP): pyproject.toml stubs/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --quiet --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -e ./stubs -e '.[dev]'
	touch $@

$(BUF_STAMP): $(BUF_DIR)/package.json $(BUF_DIR)/package-lock.json
	npm ci --prefix $(BUF_DIR) --no-audit --no-fund
	touch $@

proto: $(VENV_STAMP) ## Regenerate stubs/raptorflow/data/v1 from protos/
	$(PY) tools/gen_protos.py

proto-check: proto ## Regenerate, then fail if the generated code differs from git
	@if [ -n "$$(git status --porcelain -- $(GENERATED))" ]; then \
	  echo "proto-check: $(GENERATED) is not what protos/ generate (or is uncommitted):" >&2; \
	  git status --porcelain -- $(GENERATED) >&2; \
	  git --no-pager diff --stat -- $(GENERATED) >&2; \
	  git --no-pager diff -- $(GENERATED) >&2; \
	  echo "Commit the regenerated files." >&2; \
	  exit 1; \
	fi
	@echo "proto-check: $(GENERATED) matches protos/"

lint: $(VENV_STAMP) $(BUF_STAMP) ## ruff, ruff format --check, mypy --strict, buf lint and buf format
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(TYPED_PATHS)
	cd protos && ../$(BUF) lint
	cd protos && ../$(BUF) format --diff --exit-code

# With the embedded database, a demo table (tools/dev_schema.py) makes the
# README's walkthrough work on the first run; your own DATABASE_URL is left alone.
# tools/dev_auth.py keeps a dev token key in .devdb/ and prints an admin token.
run: $(VENV_STAMP) ## Serve on $RAPTORFLOW_LISTEN (default 127.0.0.1:50051)
ifeq ($(strip $(DATABASE_URL)),)
	$(call with_database,raptorflow_dev) $(PY) tools/dev_schema.py
endif
	$(call with_database,raptorflow_dev) $(PY) tools/dev_auth.py -- \
	  $(VENV)/bin/raptorflow-data serve --listen $(RAPTORFLOW_LISTEN)

# pytest's exit status reaches make unchanged (5 when no test ran), so a run
# that tested nothing fails.
test: $(VENV_STAMP) ## Run pytest; extra arguments in PYTEST_ARGS
	$(call with_database,raptorflow_test) $(PY) -m pytest $(PYTEST_ARGS)

# Not part of `check`: timings on a shared machine are not a pass/fail test.
bench: $(VENV_STAMP) ## Run the benchmark suite (python -m bench.suite); arguments in BENCH_ARGS
	$(call with_database,raptorflow_bench) $(PY) -m bench.suite $(BENCH_ARGS)

bench-check: $(VENV_STAMP) ## Short benchmark run; fail if a ratio fell below bench/results/baseline.json by more than its noise band
	$(call with_database,raptorflow_bench) $(PY) -m bench.check $(BENCH_ARGS)

# Not part of `check` or CI's default run: ten minutes of load with faults injected.
soak: $(VENV_STAMP) ## Soak two replicas under load with faults (python -m bench.soak, 10 min); arguments in SOAK_ARGS
	$(call with_database,raptorflow_soak) $(PY) -m bench.soak $(SOAK_ARGS)

docker: ## Build the container image $(IMAGE)
	docker build --tag $(IMAGE) .

check: lint proto-check test ## Everything a change should pass before review

clean: ## Remove .venv, buf's node_modules, caches and build output
	rm -rf $(VENV) $(BUF_DIR)/node_modules build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.git -prune -o -path ./.devdb -prune -o \
	  \( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 | xargs -0 rm -rf

distclean: clean ## Also delete the dev database cluster in .devdb/ (refuses while it runs)
	@if [ -f .devdb/pgdata/postmaster.pid ]; then \
	  echo "distclean: the .devdb cluster is running (.devdb/pgdata/postmaster.pid); stop its users first" >&2; \
	  exit 1; \
	fi
	rm -rf .devdb
