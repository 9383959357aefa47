"""Targets 5 and 6, measured on real stage processes in throwaway copies of the repository.

5. a large corpus through download, vocab and train: throughput and peak memory per stage;
6. pipeline overhead: `dvc repro` from scratch against the reference script, a no-op
   `dvc repro`, and each stage's wall time with how much of it is imports.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ruamel.yaml import YAML

from benchmarks.measure import (
    REPO_ROOT,
    Row,
    fmt_bytes,
    fmt_seconds,
    import_seconds,
    interleaved_medians,
    run_child,
)

# The throwaway repo copy that the end-to-end tests use, so both measure the same thing.
from testbed import make_repo_copy

STAGES = ("download", "vocab", "train", "evaluate", "register", "sample")
# Stages that must never load torch: they only move bytes and characters.
TORCH_FREE_STAGES = ("download", "vocab")
MAX_PEAK_OVER_CORPUS = 1.5
MIN_MB_PER_S = 50
MAX_REPRO_RATIO = 2.5
MAX_NOOP_REPRO_S = 2.0

# What a stage process pays before its own work: MLflow's import and opening the store, as every
# stage does first (store.connect), ...
MLFLOW_STARTUP = (
    "from pipeline.tracking import store; from pipeline.params import load_params; "
    "store.connect(load_params().tracking.experiment_name)"
)
# ... and, to train, torch and torch._dynamo, which torch.optim loads on first use. The reference
# script pays this one too.
TORCH_STARTUP = "import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"


def child_env(corpus: Path, threads: int) -> dict[str, str]:
    """This venv first, the corpus as a file:// source, a local MLflow store, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        BIGRAM_CORPUS_URL=corpus.as_uri(),
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS=str(threads),
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@localhost",
    )
    return env


def build_corpus(source: Path, size_bytes: int, destination: Path) -> str:
    """Concatenate copies of source until size_bytes is reached; return the sha256."""
    chunk = source.read_bytes()
    digest = hashlib.sha256()
    written = 0
    with open(destination, "wb") as out:
        while written < size_bytes:
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return digest.hexdigest()


def set_corpus_checksum(repo: Path, sha256: str) -> None:
    yaml = YAML()
    path = repo / "params.yaml"
    params = yaml.load(path)
    params["data"]["sha256"] = sha256
    yaml.dump(params, path)


@dataclass
class StageRun:
    wall_s: float
    imports_s: float
    peak_rss_bytes: int
    modules: set[str]


def run_stages(repo: Path, env: dict[str, str], stages=STAGES) -> dict[str, StageRun]:
    """Run stages in order, as `dvc repro` would, each under `python -X importtime`."""
    runs = {}
    for stage in stages:
        result = run_child(
            [sys.executable, "-X", "importtime", "-m", f"pipeline.stages.{stage}"], repo, env
        )
        imports_s, modules = import_seconds(result.stderr)
        runs[stage] = StageRun(result.wall_s, imports_s, result.peak_rss_bytes, modules)
    return runs


def data_path_seconds(corpus: Path, sha256: str, scratch: Path) -> dict[str, float]:
    """Seconds each stage spends on the corpus itself, its functions called in this process:
    the part that scales with the corpus, without imports and MLflow (see target 6)."""
    from pipeline.lm.counts import bigram_counts
    from pipeline.lm.tokens import load_tokens, to_device_tokens
    from pipeline.stages.download import download_verified
    from pipeline.stages.vocab import count_characters, encode_split

    train_path, val_path = scratch / "train.npy", scratch / "val.npy"
    started = time.perf_counter()
    download_verified(corpus.as_uri(), sha256, scratch / "input.txt")
    downloaded = time.perf_counter()
    counts = count_characters(scratch / "input.txt")
    chars = [chr(code) for code in np.flatnonzero(counts)]
    num_train = int(0.9 * counts.sum())
    encode_split(
        scratch / "input.txt", chars, num_train, int(counts.sum()) - num_train, train_path, val_path
    )
    encoded = time.perf_counter()
    for path in (train_path, val_path):
        bigram_counts(to_device_tokens(load_tokens(path), "cpu"), len(chars))
    counted = time.perf_counter()
    for path in (scratch / "input.txt", train_path, val_path):
        path.unlink()
    return {
        "download": downloaded - started,
        "vocab": encoded - downloaded,
        "train": counted - encoded,
    }


def corpus_rows(corpus: Path, size_mb: int, work_dir: Path, threads: int) -> list[Row]:
    """Target 5: download, vocab and train on a corpus of size_mb MB (copies of the corpus)."""
    big_corpus = work_dir / "big-corpus.txt"
    sha256 = build_corpus(corpus, size_mb * 10**6, big_corpus)
    size = big_corpus.stat().st_size
    env = child_env(big_corpus, threads)
    repo = make_repo_copy(work_dir / "big-corpus-repo", env)
    set_corpus_checksum(repo, sha256)
    big = run_stages(repo, env, ("download", "vocab", "train"))
    small_env = child_env(corpus, threads)
    small = run_stages(
        make_repo_copy(work_dir / "small-corpus-repo", small_env),
        small_env,
        ("download", "vocab", "train"),
    )
    data_path_s = data_path_seconds(big_corpus, sha256, work_dir)
    big_corpus.unlink()
    rows = []
    for stage, run in big.items():
        rate = size / 1e6 / data_path_s[stage]
        peak_ratio = run.peak_rss_bytes / size
        bounded = stage in ("download", "vocab")
        work = {"download": "fetch + sha256", "vocab": "count + encode", "train": "count bigrams"}
        rows.append(
            Row(
                "5 corpus size",
                f"{stage}, {size / 1e6:.0f} MB: {work[stage]} throughput (whole stage wall)",
                "",
                f"{rate:.0f} MB/s ({fmt_seconds(run.wall_s)})",
                "",
                f">= {MIN_MB_PER_S} MB/s" if bounded else "",
                rate >= MIN_MB_PER_S if bounded else None,
            )
        )
        rows.append(
            Row(
                "5 corpus size",
                f"{stage}, {size / 1e6:.0f} MB: peak RSS (on the "
                f"{corpus.stat().st_size / 1e6:.1f} MB corpus)",
                "",
                f"{fmt_bytes(run.peak_rss_bytes)} = {peak_ratio:.2f}x corpus "
                f"({fmt_bytes(small[stage].peak_rss_bytes)})",
                "",
                f"< {MAX_PEAK_OVER_CORPUS}x corpus" if bounded else "",
                peak_ratio < MAX_PEAK_OVER_CORPUS if bounded else None,
            )
        )
    return rows


def overhead_rows(corpus: Path, work_dir: Path, threads: int, repeats: int) -> list[Row]:
    """Target 6: a full `dvc repro` against the reference script, run in turns."""
    env = child_env(corpus, threads)
    reference_walls, repro_walls = [], []
    for attempt in range(repeats):
        reference_run = run_child(
            [sys.executable, "-m", "benchmarks.reference", str(corpus)], REPO_ROOT, env
        )
        reference_walls.append(reference_run.wall_s)
        repo = make_repo_copy(work_dir / f"repro-{attempt}", env)
        repro_walls.append(run_child(["dvc", "repro"], repo, env).wall_s)
    noop_runs = [run_child(["dvc", "repro"], repo, env) for _ in range(3)]
    # Only the link stage, which DVC runs every time (about 0.1 s), may run.
    reran = [re.findall(r"Running stage '(\w+)'", run.stdout) for run in noop_runs]
    assert all(stages == ["link"] for stages in reran), f"no-op repro reran {reran}"
    noop_s = statistics.median(run.wall_s for run in noop_runs)
    reference_s = statistics.median(reference_walls)
    repro_s = statistics.median(repro_walls)
    stages = run_stages(make_repo_copy(work_dir / "stages", env), env)
    startup = startup_seconds(repo, env, work_dir / "new-stores", repeats=max(3, repeats))

    rows = [
        Row(
            "6 overhead",
            "`dvc repro` with nothing to do",
            "",
            fmt_seconds(noop_s),
            "",
            f"< {MAX_NOOP_REPRO_S:g} s",
            noop_s < MAX_NOOP_REPRO_S,
        ),
        Row(
            "6 overhead",
            "full `dvc repro` from scratch vs the reference script, wall",
            fmt_seconds(reference_s),
            fmt_seconds(repro_s),
            f"{repro_s / reference_s:.1f}x",
            f"<= {MAX_REPRO_RATIO:g}x",
            repro_s / reference_s <= MAX_REPRO_RATIO,
        ),
        *startup_rows(startup, noop_s, reference_s),
    ]
    for stage, run in stages.items():
        torch_free = "torch" not in run.modules
        rows.append(
            Row(
                "6 overhead",
                f"stage {stage}: wall (imports)"
                + ("; imports torch?" if stage in TORCH_FREE_STAGES else ""),
                "",
                f"{fmt_seconds(run.wall_s)} ({fmt_seconds(run.imports_s)}, "
                f"{run.imports_s / run.wall_s:.0%})"
                + ("" if stage not in TORCH_FREE_STAGES else "; no" if torch_free else "; yes"),
                "",
                "no torch" if stage in TORCH_FREE_STAGES else "",
                torch_free if stage in TORCH_FREE_STAGES else None,
            )
        )
    total = sum(run.wall_s for run in stages.values())
    total_imports = sum(run.imports_s for run in stages.values())
    rows.append(
        Row(
            "6 overhead",
            "all five stages: wall (imports)",
            "",
            f"{fmt_seconds(total)} ({fmt_seconds(total_imports)}, {total_imports / total:.0%})",
            "",
            "",
            None,
        )
    )
    return rows


def startup_seconds(
    repo: Path, env: dict[str, str], scratch: Path, repeats: int
) -> dict[str, float]:
    """Median wall of fresh processes that only start up: MLflow on the repo's store, MLflow
    creating a new store (DVC_ROOT points it at an empty folder), and torch for training."""
    new_stores = iter(range(repeats))

    def mlflow_on_new_store() -> None:
        root = scratch / str(next(new_stores))
        root.mkdir(parents=True)
        run_child([sys.executable, "-c", MLFLOW_STARTUP], repo, {**env, "DVC_ROOT": str(root)})

    return interleaved_medians(
        {
            "mlflow": lambda: run_child([sys.executable, "-c", MLFLOW_STARTUP], repo, env),
            "mlflow_new_store": mlflow_on_new_store,
            "torch": lambda: run_child([sys.executable, "-c", TORCH_STARTUP], repo, env),
        },
        repeats,
    )


def startup_rows(startup: dict[str, float], noop_s: float, reference_s: float) -> list[Row]:
    """The floor of target 6: start-up that five MLflow-logging stage processes pay before any
    work, against the reference script's whole run."""
    # The first stage of a fresh clone creates the store; the other four open it.
    mlflow_s = startup["mlflow_new_store"] + (len(STAGES) - 1) * startup["mlflow"]
    floor_s = mlflow_s + startup["torch"] + noop_s
    return [
        Row(
            "6 overhead",
            "start-up of a stage process: import MLflow, open the SQLite store",
            "",
            f"{fmt_seconds(startup['mlflow'])} (new store: "
            f"{fmt_seconds(startup['mlflow_new_store'])})",
            "",
            "",
            None,
        ),
        Row(
            "6 overhead",
            "start-up of torch for training: import, torch.optim loads torch._dynamo",
            "",
            fmt_seconds(startup["torch"]),
            "",
            "",
            None,
        ),
        Row(
            "6 overhead",
            "floor, before any work: 5 stage start-ups + torch + no-op `dvc repro`",
            fmt_seconds(reference_s),
            fmt_seconds(floor_s),
            f"{floor_s / reference_s:.1f}x",
            "",
            None,
        ),
    ]
