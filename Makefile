# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
# CPU-only machines pass TORCH_REQUIREMENT=torch==<version> to take the small CPU wheel.
TORCH_REQUIREMENT ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro pipeline-lock test lint format bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_REQUIREMENT)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The committed dvc.lock and metrics: a real run of the default params, which a fresh
# clone reproduces byte for byte. Run after any change to pipeline/, dvc.yaml or params.yaml.
pipeline-lock: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	git add dvc.lock data/evaluate/metrics.json

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ruff format --check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks.run

# Run on a GPU machine: the CUDA tests and the GPU training rows (benchmarks/gpu_check.py). Such a
# machine has PyTorch but no .venv, so it runs with its own python3.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV)
