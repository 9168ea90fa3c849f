# free-dfml: `make demo` and `make test` each create .venv if missing (or stale against
# pyproject.toml), install the project into it (editable), then run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip on machines with a local wheel mirror prints one warning per mirror entry; keep the log readable
PIPFILTER := { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test test-fast bench-quick clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing free-dfml into $(VENV) (first time: a few minutes)"
	@$(BIN)/python -m pip install -q -e ".[dev]" 2>&1 | $(PIPFILTER)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/free-sim run --preset demo --out runs/demo

# one test process per core (at most 4); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= auto
PYTEST_PAR := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --maxprocesses 4 --dist loadgroup)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PAR)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PAR) -m "not slow"

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --preset quick --out runs/bench/quick

clean-venv:
	rm -rf $(VENV)
