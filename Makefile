# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install the project into it when needed, at the versions pinned in
# requirements.lock (the set the tests passed with); `make lock` refreshes that file.
PYTHON ?= python3
VENV ?= .venv
# PyTorch's build. PyPI's torch for Linux is the CUDA build (GBs of nvidia-* wheels), so Linux
# without a working `nvidia-smi` takes the CPU wheel from PyTorch's own index; elsewhere PyPI's.
# Setting TORCH_REQUIREMENT or TORCH_INDEX_URL (empty: pip's own index) skips this guess; CI sets
# TORCH_REQUIREMENT=torch==2.13.0, which pip finds in its local wheel folder.
TORCH_CPU_INDEX_URL := https://download.pytorch.org/whl/cpu
ifeq ($(origin TORCH_REQUIREMENT)$(origin TORCH_INDEX_URL),undefinedundefined)
# Deferred (=): runs nvidia-smi only when the install recipe needs it.
TORCH_INDEX_URL = $(shell [ "$$(uname -s)" = Linux ] && ! nvidia-smi >/dev/null 2>&1 \
	&& echo $(TORCH_CPU_INDEX_URL))
endif
TORCH_REQUIREMENT ?= torch
# torch alone from that index: its dependencies come with the project's, at the lock's versions.
TORCH_INDEX_ARGS = $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL) --no-deps)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: install lock repro pipeline-lock plots leaderboard ladder test test-fast lint format bench gpu-check clean

install: $(STAMP)

# The lock leaves torch out (the TORCH_ knobs pick the build) but pins its dependencies.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint $(LOCK) $(TORCH_INDEX_ARGS) "$(TORCH_REQUIREMENT)"
	$(BIN)/pip install --quiet --constraint $(LOCK) -e '.[dev]'
	touch $@

# Re-resolve every dependency to its newest release allowed by pyproject.toml, for all
# platforms; then run `make test` and commit requirements.lock if it passes.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra postgres --extra gpu --extra s3 --no-emit-package torch \
		--universal --upgrade --python $(BIN)/python --custom-compile-command "make lock" \
		--quiet -o $(LOCK)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The committed dvc.lock and metrics: a real run of the default params, which a fresh
# clone reproduces byte for byte. Run after any change to pipeline/, dvc.yaml or params.yaml.
pipeline-lock: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	git add dvc.lock data/evaluate/metrics.json data/train/loss_curve.csv

# DVC's plots page with vega inlined, drawn without a network: dvc_plots/index.html.
# `make plots PLOTS="diff main <exp>"` compares revisions; PLOTS takes any `dvc plots` arguments.
PLOTS ?= show
plots: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/offline_plots.py $(PLOTS)

# Every evaluated training run in the MLflow store, lowest val loss first, as a Markdown table
# (printed, and written to leaderboard.md).
leaderboard: $(STAMP)
	$(BIN)/python -m pipeline.leaderboard --output leaderboard.md

# The ladder's CPU steps (docs/LADDER.md), each trained anew (-f) from the committed params in a
# temporary copy (--temp: the workspace is left as it is), logged to a store of their own,
# ladder.db; then their leaderboard replaces the table of docs/LADDER.md. About 25 minutes on
# 2 cores.
SMALL_GPT := -S model.type=gpt -S train.lr=1e-3 -S train.max_iters=5000 -S train.eval_interval=500
BABY_GPT := -S model.type=gpt -S model.n_layer=4 -S model.n_head=4 -S model.n_embd=128 \
	-S train.block_size=64 -S train.batch_size=12 -S train.max_iters=2000 \
	-S train.eval_interval=250 -S train.lr=1e-3 -S train.eval_iters=20
LADDER_RUN = PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/ladder.db \
	$(BIN)/dvc exp run --temp -f
ladder: $(STAMP)
	$(LADDER_RUN) -n bigram
	$(LADDER_RUN) -n small-gpt $(SMALL_GPT)
	$(LADDER_RUN) -n baby-gpt $(BABY_GPT)
	$(LADDER_RUN) -n baby-gpt-cosine $(BABY_GPT) -S train.lr_schedule=cosine -S train.warmup_iters=100
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/ladder.db $(BIN)/python -m pipeline.leaderboard \
		--into docs/LADDER.md

# Lint and type check first (`make lint`), then the whole suite on every core (pytest-xdist; a
# test file stays on one worker, so that its module fixtures are built once; the longest files
# start first: tests/conftest.py), then the 15 slowest tests. `make test-fast`: the same without
# the tests that run the real pipeline (e2e), for the inner loop, on one worker more than there
# are cores: its tests wait on servers and timeouts more than the pipeline's, which keep every
# core busy.
PYTEST_WORKERS ?= auto
PYTEST_FAST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
PYTEST = PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest --dist loadfile --no-loadscope-reorder
test: lint
	$(PYTEST) -n $(PYTEST_WORKERS) --durations=15

test-fast: lint
	$(PYTEST) -n $(PYTEST_FAST_WORKERS) -m "not e2e"

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks.run

# Run on a GPU machine: the CUDA tests and the GPU training rows (benchmarks/gpu_check.py). Such a
# machine has PyTorch but no .venv, so it runs with its own python3.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# ruff, then mypy on pipeline/ (configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV)
