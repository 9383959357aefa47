"""What a user waits for, measured against the reference script in the same run.

- scale: a full `dvc repro` at the lecture's 3000 steps and at 10x that (evaluations every 300
  steps in both), against the reference script at the same settings, and the crossover: the
  number of steps at which the pipeline, tracking and all, becomes faster end to end.
- stage cost: what each stage pays beyond its own work (its wall time minus the span of its
  MLflow run), against the floor that no stage can avoid: a bare interpreter that imports MLflow
  and opens the store, plus torch for the stages that use it, measured in the same run.
- turnaround: one `dvc exp run -S train.lr=2e-2` on a repo whose data stages are cached, and 8
  queued experiments at `-j 1` and `-j 2`, against running the reference script 8 times.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.measure import REPO_ROOT, Row, fmt_seconds, interleaved_medians, run_child
from benchmarks.stages import MLFLOW_STARTUP, STAGES, child_env
from testbed import commit_all, make_repo_copy, update_params

DEFAULT_STEPS = 3_000
SCALED_STEPS = 30_000
EVAL_INTERVAL = 300
MAX_SCALED_RATIO = 0.5
MAX_STAGE_EXTRA_S = 0.2
MAX_EXPERIMENT_RATIO = 1.5
QUEUED_EXPERIMENTS = 8
QUEUE_TIMEOUT_S = 1800

# The floor of each stage: what it cannot avoid importing and opening before its own work.
FLOOR_CODE = {
    "mlflow": MLFLOW_STARTUP,
    "mlflow + torch": f"{MLFLOW_STARTUP}; import torch",
    # torch.optim loads torch._dynamo on first use; only training builds an optimizer.
    "mlflow + torch + optim": (
        f"{MLFLOW_STARTUP}; import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"
    ),
}
STAGE_FLOOR = {
    "download": "mlflow",
    "vocab": "mlflow",
    "train": "mlflow + torch + optim",
    "evaluate": "mlflow + torch",
    "sample": "mlflow + torch",
}


def reference_seconds(corpus: Path, env: dict[str, str], max_iters: int) -> float:
    command = [sys.executable, "-m", "benchmarks.reference", str(corpus)]
    options = ["--max-iters", str(max_iters), "--eval-interval", str(EVAL_INTERVAL)]
    return run_child(command + options, REPO_ROOT, env).wall_s


def repo_with_steps(destination: Path, env: dict[str, str], max_iters: int) -> Path:
    repo = make_repo_copy(destination, env)
    update_params(repo, train={"max_iters": max_iters, "eval_interval": EVAL_INTERVAL})
    commit_all(repo, env, f"{max_iters} steps")
    return repo


def scale_rows(corpus: Path, work_dir: Path, threads: int, repeats: int) -> list[Row]:
    """Full `dvc repro` from scratch against the reference at 3000 and 30,000 steps."""
    env = child_env(corpus, threads)
    walls: dict[tuple[str, int], list[float]] = {}
    for attempt in range(repeats):
        for steps in (DEFAULT_STEPS, SCALED_STEPS):
            walls.setdefault(("reference", steps), []).append(reference_seconds(corpus, env, steps))
            repo = repo_with_steps(work_dir / f"scale-{steps}-{attempt}", env, steps)
            walls.setdefault(("pipeline", steps), []).append(
                run_child(["dvc", "repro"], repo, env).wall_s
            )
    median = {key: statistics.median(values) for key, values in walls.items()}
    rows = []
    for steps in (DEFAULT_STEPS, SCALED_STEPS):
        reference_s, pipeline_s = median["reference", steps], median["pipeline", steps]
        ratio = pipeline_s / reference_s
        scaled = steps == SCALED_STEPS
        rows.append(
            Row(
                "scale",
                f"full `dvc repro` vs the reference, {steps:,} steps, evals every {EVAL_INTERVAL}",
                fmt_seconds(reference_s),
                fmt_seconds(pipeline_s),
                f"{ratio:.2f}x",
                f"<= {MAX_SCALED_RATIO}x" if scaled else "",
                ratio <= MAX_SCALED_RATIO if scaled else None,
            )
        )
    rows.append(crossover_row(median))
    return rows


def crossover_row(median: dict[tuple[str, int], float]) -> Row:
    """Each side's wall time as a line in the number of steps, through its two points."""
    span = SCALED_STEPS - DEFAULT_STEPS

    def line(side: str) -> tuple[float, float]:
        per_step = (median[side, SCALED_STEPS] - median[side, DEFAULT_STEPS]) / span
        return median[side, DEFAULT_STEPS] - per_step * DEFAULT_STEPS, per_step

    reference_fixed, reference_per_step = line("reference")
    pipeline_fixed, pipeline_per_step = line("pipeline")
    if reference_per_step > pipeline_per_step:
        crossover = (pipeline_fixed - reference_fixed) / (reference_per_step - pipeline_per_step)
        found = f"{max(crossover, 0):,.0f} steps"
    else:
        found = "never (the pipeline's steps are not cheaper)"
    return Row(
        "scale",
        "crossover; seconds per 1000 steps with evals (reference / pipeline)",
        f"{reference_per_step * 1000:.2f} s",
        f"{found}; {pipeline_per_step * 1000:.2f} s",
    )


def stage_cost_rows(corpus: Path, work_dir: Path, threads: int, repeats: int) -> list[Row]:
    """Each stage's wall time minus its own work (its MLflow run), against its floor."""
    from mlflow import MlflowClient

    env = child_env(corpus, threads)
    repo = make_repo_copy(work_dir / "stage-cost", env)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    extra: dict[str, list[float]] = {stage: [] for stage in STAGES}
    walls: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(repeats + 1):  # The first round creates the store: not counted.
        for stage in STAGES:
            wall_s = run_child([sys.executable, "-m", f"pipeline.{stage}"], repo, env).wall_s
            walls[stage].append(wall_s)
            extra[stage].append(wall_s - latest_run_seconds(client, stage))
    floors = interleaved_medians(
        {
            kind: lambda code=code: run_child([sys.executable, "-c", code], repo, env)
            for kind, code in FLOOR_CODE.items()
        },
        repeats,
    )
    rows = [
        Row("stage cost", f"floor: {kind}", "", fmt_seconds(seconds))
        for kind, seconds in floors.items()
    ]
    for stage in STAGES:
        floor_s = floors[STAGE_FLOOR[stage]]
        extra_s = statistics.median(extra[stage][1:])
        beyond = extra_s - floor_s
        rows.append(
            Row(
                "stage cost",
                f"{stage}: wall, and wall minus its run beyond the floor ({STAGE_FLOOR[stage]})",
                "",
                f"{fmt_seconds(statistics.median(walls[stage][1:]))}, {beyond:+.2f} s",
                "",
                f"<= {MAX_STAGE_EXTRA_S} s",
                beyond <= MAX_STAGE_EXTRA_S,
            )
        )
    return rows


def latest_run_seconds(client, stage: str) -> float:
    """How long the newest run of a stage lasted: the stage's own work, as MLflow saw it."""
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    (run,) = client.search_runs(
        experiment_ids,
        filter_string=f"tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return (run.info.end_time - run.info.start_time) / 1000


def turnaround_rows(corpus: Path, work_dir: Path, threads: int, repeats: int) -> list[Row]:
    """One experiment, and eight queued ones, on a repo whose data stages are cached."""
    env = child_env(corpus, threads)
    repo = make_repo_copy(work_dir / "turnaround", env)
    run_child(["dvc", "repro"], repo, env)
    commit_all(repo, env, "baseline run")
    reference_runs = [reference_seconds(corpus, env, DEFAULT_STEPS) for _ in range(repeats)]
    reference_s = statistics.median(reference_runs)
    one_s = run_child(["dvc", "exp", "run", "-S", "train.lr=2e-2"], repo, env).wall_s
    ratio = one_s / reference_s
    rows = [
        Row(
            "turnaround",
            "`dvc exp run -S train.lr=2e-2`, data stages cached, vs one reference run",
            fmt_seconds(reference_s),
            fmt_seconds(one_s),
            f"{ratio:.2f}x",
            f"<= {MAX_EXPERIMENT_RATIO}x",
            ratio <= MAX_EXPERIMENT_RATIO,
        )
    ]
    reference_per_minute = 60 / reference_s
    learning_rates = iter(f"{1e-3 * (i + 1):.3g}" for i in range(2 * QUEUED_EXPERIMENTS))
    for jobs in (1, 2):
        overrides = [f"train.lr={next(learning_rates)}" for _ in range(QUEUED_EXPERIMENTS)]
        seconds = queued_seconds(repo, env, overrides, jobs)
        per_minute = QUEUED_EXPERIMENTS * 60 / seconds
        rows.append(
            Row(
                "turnaround",
                f"{QUEUED_EXPERIMENTS} queued experiments, `dvc queue start -j {jobs}`: "
                "experiments/min (wall)",
                f"{reference_per_minute:.1f} ({fmt_seconds(QUEUED_EXPERIMENTS * reference_s)})",
                f"{per_minute:.1f} ({fmt_seconds(seconds)})",
                f"{per_minute / reference_per_minute:.2f}x",
            )
        )
    return rows


def queued_seconds(repo: Path, env: dict[str, str], overrides: list[str], jobs: int) -> float:
    """Queue one experiment per override, start `jobs` workers; seconds until all are done."""
    for override in overrides:
        run_child(["dvc", "exp", "run", "--queue", "-S", override], repo, env)
    done_before = experiment_refs(repo)
    started = time.perf_counter()
    run_child(["dvc", "queue", "start", "-j", str(jobs)], repo, env)
    deadline = started + QUEUE_TIMEOUT_S
    while experiment_refs(repo) < done_before + len(overrides):
        status = run_child(["dvc", "queue", "status"], repo, env).stdout
        if "Failed" in status:
            raise RuntimeError(f"a queued experiment failed in {repo}:\n{status}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"queue in {repo} still busy after {QUEUE_TIMEOUT_S} s")
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    run_child(["dvc", "queue", "stop"], repo, env)
    return seconds


def experiment_refs(repo: Path) -> int:
    """Finished experiments are git refs under refs/exps: cheap to count while workers run."""
    refs = subprocess.run(
        ["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    # An experiment's ref is refs/exps/<baseline commit>/<name>; the queue keeps its own refs
    # (refs/exps/celery/...) beside them.
    return len(re.findall(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/", refs))
