"""What a user waits for, measured against the reference script in the same run.

- scale: a full `dvc repro` at the lecture's 3000 steps and at 10x that (evaluations every 300
  steps in both), against the reference script at the same settings, and the crossover: the
  number of steps at which the pipeline, tracking and all, becomes faster end to end.
- stage cost: what each stage pays beyond its own work (its wall time minus the span of its
  MLflow run), against the floor that no stage can avoid: a bare interpreter that imports MLflow
  and opens the store, plus torch for the stages that use it, measured in the same run. The link
  stage starts no MLflow run: all of its wall time counts, against a bare interpreter.
- turnaround: one `dvc exp run -S train.lr=2e-2` on a repo whose data stages are cached, and 8
  queued experiments at `-j 1` and `-j 2`, against running the reference script 8 times
  (`--quick`: 2 queued experiments per batch and 2 reference runs).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from benchmarks.measure import REPO_ROOT, Row, fmt_seconds, interleaved_medians, run_child
from benchmarks.stages import MLFLOW_STARTUP, STAGES, child_env
from pipeline.files import process_is_alive
from testbed import commit_all, make_repo_copy, update_params

DEFAULT_STEPS = 3_000
SCALED_STEPS = 30_000
EVAL_INTERVAL = 300
MAX_SCALED_RATIO = 0.5
MAX_STAGE_EXTRA_S = 0.2
MAX_EXPERIMENT_RATIO = 1.5
QUEUED_EXPERIMENTS = 8
QUEUE_TIMEOUT_S = 1800
# Workers of one batch must be gone before the next batch is queued (DVC's end themselves after
# 10 s idle; `dvc queue stop` asks them sooner).
WORKER_EXIT_TIMEOUT_S = 120
# The baseline's learning rate, and the single experiment's: no queued experiment may repeat
# them, or DVC would restore its training from the run-cache instead of running it.
BASELINE_LR = 1e-2
SINGLE_EXPERIMENT_LR = "2e-2"

# The stages, in `dvc repro`'s order. The link stage starts no MLflow run at all; on its fast
# path, the one it takes right after training (run.json names the model, no run is left
# RUNNING), it imports neither MLflow nor torch (pipeline/stages/link.py). All of its wall time
# counts, against a bare interpreter.
COST_STAGES = (*STAGES, "link")
# The floor of each stage: what it cannot avoid importing and opening before its own work,
# started the way a stage starts: the garbage collector off while the libraries load, then on
# (pipeline/__init__.py, pipeline.cli). A bare interpreter's MLflow floor is shown beside.
AS_A_STAGE = "import gc; gc.disable(); {}; gc.enable()"
OPTIMIZER = "import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"
FLOOR_CODE = {
    "interpreter": "pass",
    "mlflow, bare interpreter": MLFLOW_STARTUP,
    "mlflow": AS_A_STAGE.format(MLFLOW_STARTUP),
    "mlflow + torch": AS_A_STAGE.format(f"{MLFLOW_STARTUP}; import torch"),
    # torch.optim loads torch._dynamo on first use; only training builds an optimizer.
    "mlflow + torch + optim": AS_A_STAGE.format(f"{MLFLOW_STARTUP}; {OPTIMIZER}"),
}
STAGE_FLOOR = {
    "download": "mlflow",
    "vocab": "mlflow",
    "train": "mlflow + torch + optim",
    "evaluate": "mlflow + torch",
    "register": "mlflow + torch",
    "sample": "mlflow + torch",
    "link": "interpreter",
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
    """Each side's wall time as a line in the number of steps, through its two points; the
    crossover is where the lines meet."""
    span = SCALED_STEPS - DEFAULT_STEPS

    def line(side: str) -> tuple[float, float]:
        per_step = (median[side, SCALED_STEPS] - median[side, DEFAULT_STEPS]) / span
        return median[side, DEFAULT_STEPS] - per_step * DEFAULT_STEPS, per_step

    reference_fixed, reference_per_step = line("reference")
    pipeline_fixed, pipeline_per_step = line("pipeline")
    if pipeline_per_step < reference_per_step:
        crossover = (pipeline_fixed - reference_fixed) / (reference_per_step - pipeline_per_step)
        found = f"{crossover:,.0f} steps" if crossover > 0 else "none: faster at any length"
    elif pipeline_fixed < reference_fixed:
        # Cheaper to start, dearer per step: faster up to where the lines meet, if they do.
        found = (
            "none: faster at any length"
            if pipeline_per_step == reference_per_step
            else "none: faster only below "
            f"{(reference_fixed - pipeline_fixed) / (pipeline_per_step - reference_per_step):,.0f}"
            " steps"
        )
    else:
        found = "never: neither its start nor its steps are cheaper"
    return Row(
        "scale",
        "crossover (steps from which the pipeline is faster); seconds per 1000 steps with evals",
        f"{reference_per_step * 1000:.2f} s",
        f"{found}; {pipeline_per_step * 1000:.2f} s",
    )


def stage_cost_rows(corpus: Path, work_dir: Path, threads: int, repeats: int) -> list[Row]:
    """Each stage's wall time minus its own work (the span of its MLflow run), against its floor.

    The stages run as DVC runs them (`python -m pipeline.<stage>` in a repo copy), in order,
    repeats + 1 times; the first round creates the store and is not counted.
    """
    from mlflow import MlflowClient

    env = child_env(corpus, threads)
    repo = make_repo_copy(work_dir / "stage-cost", env)
    client = None  # Opened once the download stage has made the store, as the stages make it.
    extra: dict[str, list[float]] = {stage: [] for stage in COST_STAGES}
    walls: dict[str, list[float]] = {stage: [] for stage in COST_STAGES}
    for _ in range(repeats + 1):
        for stage in COST_STAGES:
            launched_ms = int(time.time() * 1000)
            wall_s = run_child([sys.executable, "-m", f"pipeline.stages.{stage}"], repo, env).wall_s
            client = client or MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
            walls[stage].append(wall_s)
            extra[stage].append(wall_s - (own_run_seconds(client, stage, launched_ms) or 0.0))
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
    for stage in COST_STAGES:
        floor_s = floors[STAGE_FLOOR[stage]]
        beyond = statistics.median(extra[stage][1:]) - floor_s
        run = "no MLflow run, all of it" if stage in RUNLESS_STAGES else "minus its MLflow run"
        rows.append(
            Row(
                "stage cost",
                f"{stage}: wall; wall ({run}) beyond the floor ({STAGE_FLOOR[stage]})",
                "",
                f"{fmt_seconds(statistics.median(walls[stage][1:]))}; {beyond:+.2f} s",
                "",
                f"<= {MAX_STAGE_EXTRA_S} s",
                beyond <= MAX_STAGE_EXTRA_S,
            )
        )
    return rows


# Stages that start no MLflow run (see COST_STAGES).
RUNLESS_STAGES = frozenset({"link"})


def own_run_seconds(client, stage: str, launched_ms: int) -> float | None:
    """How long the MLflow run of a stage process launched at launched_ms lasted: the stage's own
    work, as MLflow saw it. None for a stage that starts no run (link).

    pipeline.tracking.runs.stage_run tags every run it starts with ``stage = <name>`` (evaluate's
    and sample's are child runs of the training run, tagged with their own stage): a stage's own run
    is the one run so tagged that started after its process was launched. Anything else means
    the assumption no longer holds, and the figure would be wrong: that fails the benchmark.
    """
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.stage = '{stage}' and attributes.start_time >= {launched_ms}",
    )
    if stage in RUNLESS_STAGES and not runs:
        return None
    if stage in RUNLESS_STAGES or len(runs) != 1 or runs[0].info.status != "FINISHED":
        found = [(run.info.run_id, run.info.status) for run in runs]
        expected = "no run" if stage in RUNLESS_STAGES else "one FINISHED run"
        raise RuntimeError(
            f"stage {stage} should start {expected} tagged stage = '{stage}'; found {found}"
        )
    return (runs[0].info.end_time - runs[0].info.start_time) / 1000


def turnaround_rows(
    corpus: Path, work_dir: Path, threads: int, experiments: int = QUEUED_EXPERIMENTS
) -> list[Row]:
    """One experiment, and queued ones, on a repo whose data stages are cached; the reference
    runs as many times as experiments are queued, back to back (their median is one run)."""
    env = child_env(corpus, threads)
    repo = make_repo_copy(work_dir / "turnaround", env)
    run_child(["dvc", "repro"], repo, env)
    commit_all(repo, env, "baseline run")
    reference_runs = [reference_seconds(corpus, env, DEFAULT_STEPS) for _ in range(experiments)]
    reference_s = statistics.median(reference_runs)
    one = run_child(["dvc", "exp", "run", "-S", f"train.lr={SINGLE_EXPERIMENT_LR}"], repo, env)
    reran = re.findall(r"Running stage '(\w+)'", one.stdout)
    if reran != ["check", "train", "evaluate", "register", "sample", "link"]:
        raise RuntimeError(f"`dvc exp run` with a new train.lr ran stages {reran} in {repo}")
    ratio = one.wall_s / reference_s
    rows = [
        Row(
            "turnaround",
            f"`dvc exp run -S train.lr={SINGLE_EXPERIMENT_LR}`, data stages cached, "
            "vs one reference run",
            fmt_seconds(reference_s),
            fmt_seconds(one.wall_s),
            f"{ratio:.2f}x",
            f"<= {MAX_EXPERIMENT_RATIO}x",
            ratio <= MAX_EXPERIMENT_RATIO,
        )
    ]
    # Back to the baseline, so that the queued experiments start from it, not from this one.
    run_child(["git", "reset", "-q", "--hard"], repo, env)
    run_child(["dvc", "checkout", "--force"], repo, env)
    reference_total_s = sum(reference_runs)
    reference_per_minute = experiments * 60 / reference_total_s
    overrides = iter(queued_overrides(2 * experiments))
    for jobs in (1, 2):
        seconds = queued_seconds(repo, env, [next(overrides) for _ in range(experiments)], jobs)
        per_minute = experiments * 60 / seconds
        rows.append(
            Row(
                "turnaround",
                f"{experiments} queued experiments, `dvc queue start -j {jobs}`, vs the "
                f"reference {experiments} times: experiments/min (wall)",
                f"{reference_per_minute:.1f} ({fmt_seconds(reference_total_s)})",
                f"{per_minute:.1f} ({fmt_seconds(seconds)})",
                f"{per_minute / reference_per_minute:.2f}x",
            )
        )
    return rows


def queued_overrides(count: int) -> list[str]:
    """-S overrides of distinct learning rates (1.5e-3, 2.5e-3, ...), none the baseline's or the
    single experiment's, so that DVC's run-cache restores none of them: each one trains."""
    rates = [round((i + 1.5) * 1e-3, 6) for i in range(count)]
    assert not {BASELINE_LR, float(SINGLE_EXPERIMENT_LR)} & set(rates), rates
    return [f"train.lr={rate:g}" for rate in rates]


def queued_seconds(repo: Path, env: dict[str, str], overrides: list[str], jobs: int) -> float:
    """Queue one experiment per override, start `jobs` workers; seconds until all are done.

    Finished experiments are counted as git refs, cheap to read while the workers run (asking
    `dvc queue status` every half second would take CPU from them); a failed one shows as DVC's
    failed-experiment stash ref.
    """
    for override in overrides:
        run_child(["dvc", "exp", "run", "--queue", "-S", override], repo, env)
    before = experiment_refs(repo)
    started = time.perf_counter()
    try:
        run_child(["dvc", "queue", "start", "-j", str(jobs)], repo, env)
        while True:
            refs = experiment_refs(repo)
            if refs.finished >= before.finished + len(overrides):
                break
            if refs.failed != before.failed:
                status = run_child(["dvc", "queue", "status"], repo, env).stdout
                raise RuntimeError(f"a queued experiment failed in {repo}:\n{status}")
            if time.perf_counter() - started > QUEUE_TIMEOUT_S:
                raise RuntimeError(f"queue in {repo} still busy after {QUEUE_TIMEOUT_S} s")
            time.sleep(0.5)
        seconds = time.perf_counter() - started
    except BaseException:
        # No worker may outlive the benchmark, nor go on training in its scratch directory.
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)
        raise
    stop_workers(repo, env)
    return seconds


def stop_workers(repo: Path, env: dict[str, str]) -> None:
    """Stop the queue's workers and wait until they are gone, so that none of them takes the next
    batch's experiments before its own clock starts, or counts as started in its `-j`."""
    run_child(["dvc", "queue", "stop"], repo, env)
    # DVC's workers are detached processes; each writes its pid beside the queue's broker.
    pid_files = (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid")
    pids = [int(text) for text in (path.read_text().strip() for path in pid_files) if text]
    deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
    while any(process_is_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue workers {pids} of {repo} still alive after stopping")
        time.sleep(0.5)


class ExperimentRefs(NamedTuple):
    finished: int
    failed: str  # DVC's failed-experiment stash ref line ("" while none failed)


def experiment_refs(repo: Path) -> ExperimentRefs:
    """Finished experiments are git refs under refs/exps: cheap to count while workers run."""
    refs = subprocess.run(
        ["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    # An experiment's ref is refs/exps/<baseline commit>/<name>; the queue keeps its own refs
    # (refs/exps/celery/stash, refs/exps/celery/failed, ...) beside them.
    failed = [line for line in refs.splitlines() if line.split()[-1] == "refs/exps/celery/failed"]
    return ExperimentRefs(
        finished=len(re.findall(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/", refs)),
        failed="".join(failed),
    )
