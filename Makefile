# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install the project into it when needed, at the versions pinned in
# requirements.lock (the set the tests passed with); `make lock` refreshes that file.
PYTHON ?= python3
VENV ?= .venv
# CPU-only machines pass TORCH_REQUIREMENT=torch==<version> to take the small CPU wheel.
TORCH_REQUIREMENT ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: install lock repro pipeline-lock test lint format bench gpu-check clean

install: $(STAMP)

# The lock leaves torch out (TORCH_REQUIREMENT picks the build) but pins its dependencies.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint $(LOCK) "$(TORCH_REQUIREMENT)"
	$(BIN)/pip install --quiet --constraint $(LOCK) -e '.[dev]'
	touch $@

# Re-resolve every dependency to its newest release allowed by pyproject.toml, for all
# platforms; then run `make test` and commit requirements.lock if it passes.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra postgres --no-emit-package torch \
		--universal --upgrade --python $(BIN)/python --custom-compile-command "make lock" \
		--quiet -o $(LOCK)

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
