# The two README commands: `make demo` (set up + run the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := -q --disable-pip-version-check --no-warn-script-location
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip warns about every unused local index location; keep the log readable.
QUIET_PIP := { grep -v "^WARNING: Location" || true; }

.PHONY: setup demo test bench clean

$(BIN)/lossevo: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c requirements/constraints.txt -e '.[dev,slurm]' 2>&1 | $(QUIET_PIP)
	touch $(BIN)/lossevo

setup: $(BIN)/lossevo  ## virtual environment with lossevo and its dependencies

demo: setup  ## run the whole pipeline on the embedded default (digits), offline, 2 CPU cores
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	@echo "report: results/$$($(BIN)/lossevo show-experiment)/report/report.md"

test: setup  ## the test suite (what .ci/run runs)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: setup  ## performance benchmark (ratios measured side by side)
	$(BIN)/python benchmarks/bench_training.py

clean:
	rm -rf results .snakemake
