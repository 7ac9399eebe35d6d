# HydraAI: `make run` trains the default federation, `make test` checks everything.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NUM_SUPERNODES ?= 4
RUN_CONFIG ?=
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--ledger --no-wait"
BENCH_ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hydra-run --num-supernodes $(NUM_SUPERNODES) \
		$(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# About 30 minutes on 2 cores; writes docs/benchmarks.md (see bench/__main__.py).
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .flwr outputs .pytest_cache .ruff_cache
