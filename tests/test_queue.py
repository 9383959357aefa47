"""Parallel experiments: queued and --temp runs land in the workspace's one SQLite store.

DVC runs queued experiments in temporary copies of the repo; every stage must still log to the
repo-root mlflow.db, and several workers opening, creating and writing it at once must lose,
duplicate or break nothing.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from testbed import REPO_ROOT, copy_trained_repo, run, write_committed_params
from tests.support.experiments import (
    MODEL_NAME,
    check_experiments_in_store,
    check_registry,
    exp_show,
    failed_task_logs,
    queue_grid,
    start_queue,
    training_runs,
    wait_for_queue,
)
from tests.support.stages import experiment_name

# Two experiments on two workers: every worker starts at once on a store that does not exist
# yet, beside a `dvc exp run --temp`, so that three processes race to create it. (Four on four,
# and eight on four before that, proved nothing more on CI's 2 cores, at more time.) They are
# DVC's grid of two axes, as docs/OPERATIONS.md shows it; the second axis has one value, which
# every experiment of the grid takes.
GRID = {"train.lr": (3e-3, 3e-2), "train.batch_size": (48,)}


def store_client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


@pytest.mark.e2e
def test_queued_experiments_and_a_temp_one_share_one_store(trained_repo, tmp_path):
    """The reliability issue's load test and the scale issue's queue in one run of the queue:
    a grid of two experiments on two workers, and a `dvc exp run --temp` beside them.

    The copy starts without mlflow.db, so the first workers also race to create it.
    """
    repo = copy_trained_repo(trained_repo[0], tmp_path / "repo")
    env = trained_repo[1]
    axes = [f"{param}={','.join(map(str, values))}" for param, values in GRID.items()]
    grid = queue_grid(repo, env, axes)
    assert len(grid) == 2

    start_queue(repo, env, jobs=2)
    temp = run(["dvc", "exp", "run", "--temp", "-S", "train.lr=4e-2"], repo, env)
    temp_name = experiment_name(temp.stdout + temp.stderr)
    status = wait_for_queue(repo, env, experiments=3)
    assert status.count("Success") == 2, status + failed_task_logs(repo, env, status)

    # One experiment per combination of the axes.
    shown = exp_show(repo, env)
    combinations = {
        name: tuple(shown[name]["params"][p.removeprefix("train.")] for p in GRID) for name in grid
    }
    assert sorted(combinations.values()) == sorted(itertools.product(*GRID.values()))
    names = {
        name: " ".join(f"{p}={v}" for p, v in zip(GRID, values, strict=True))
        for name, values in combinations.items()
    }
    client = store_client(repo)
    runs = check_experiments_in_store(client, repo, env, {**names, temp_name: "train.lr=4e-2"})
    assert len(runs) == 3
    # Nothing else ran (download and vocab were unchanged) and no run is left RUNNING.
    assert len(training_runs(client)) == 3
    experiment = client.get_experiment_by_name("bigram")
    assert {r.info.status for r in client.search_runs([experiment.experiment_id])} == {"FINISHED"}
    check_registry(client, runs)
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 3

    head = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    for found in runs:
        # The stages logged to the workspace's store, never to one in DVC's temporary copy.
        assert found.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
        # Runs record where they came from: the queued commit, params.yaml changed by -S.
        assert found.data.tags["mlflow.source.git.commit"] == head
        assert found.data.tags["git.dirty"] == "true"
        assert found.data.tags["git.changed_files"] == "params.yaml"

    # `dvc plots diff` of the sweep overlays the grid's curves on the loss chart.
    plots = json.loads(run(["dvc", "plots", "diff", *grid, "--json"], repo, env).stdout)
    assert not plots.get("errors")
    (chart,) = plots["data"]["data/train/loss_curve.csv"]
    assert {row["rev"] for row in chart["content"]["data"]["values"]} == set(grid)

    # The leaderboard ranks all three by val loss, as MLflow has them.
    board = run([sys.executable, "-m", "pipeline.leaderboard"], repo, env).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in board.splitlines()[2:]]
    by_name = {found.info.run_name: found.data.metrics["val_loss"] for found in runs}
    assert [row[1] for row in rows] == sorted(by_name, key=by_name.__getitem__)
    # The baseline's run is in the trained repo's own store, not in this copy's.
    assert len(rows) == 3


WORKER = """
import sys, time
from pathlib import Path
import mlflow, torch
from pipeline.tracking import registry, runs
from pipeline.files import write_json
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.params import load_params
from pipeline.lm.sampling import write_sampling_defaults

work, worker = Path(sys.argv[1]), sys.argv[2]
params = load_params(work / "params.yaml")
weights, vocab = work / f"model-{worker}.pt", work / f"vocab-{worker}.json"
torch.save(BigramLanguageModel(3).state_dict(), weights)
write_json(vocab, {"chars": ["a", "b", "c"]})
(work / f"defaults-{worker}").mkdir()
defaults = write_sampling_defaults(params.sample, work / f"defaults-{worker}")
(work / f"ready-{worker}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
with runs.stage_run("train", params, run_name=f"worker-{worker}") as active:
    mlflow.log_metric("worker", int(worker))
    code = [str(Path(registry.__file__).parents[1])]  # the pipeline package
    info = registry.log_text_generator(weights, vocab, defaults, 0, code)
    registry.register_version(info.model_id, params, active.info.run_id, {"val_loss": 1.0}, {})
# Later stages reopen the store in a process that has used it, as evaluate does.
for step in range(3):
    with runs.model_run("evaluate", params, active.info.run_id, {}):
        mlflow.log_metric("evaluated", step, step=step)
"""


def test_many_processes_create_and_write_a_new_store_at_once(tmp_path):
    """Processes released together on a store that does not exist yet: one creates it under
    the lock, all log a run and register a version; nothing fails, nothing is lost."""
    workers = 4
    write_committed_params(tmp_path)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "DVC_ROOT": str(tmp_path),  # where store.tracking_uri() puts mlflow.db
        "HOME": str(tmp_path),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(i)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < workers:
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline, "workers never got ready"
        time.sleep(0.05)
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "go").touch()
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert "database is locked" not in stderr

    client = store_client(tmp_path)
    runs = training_runs(client)
    assert sorted(r.info.run_name for r in runs) == [f"worker-{i}" for i in range(workers)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    # Each later stage logs into its own child run; the training runs keep their status.
    evaluations = [r for r in mlflow_runs_of(client) if r.data.tags["stage"] == "evaluate"]
    assert len(evaluations) == 3 * workers and {r.info.status for r in evaluations} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in evaluations} == {r.info.run_id for r in runs}
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, workers + 1))
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def mlflow_runs_of(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("bigram")
    return client.search_runs([experiment.experiment_id])


def test_sqlite_store_waits_for_a_writer_instead_of_failing(tmp_path, monkeypatch):
    """The URL's timeout reaches MLflow's engine, and a write blocked by another process's
    transaction waits for it rather than failing with "database is locked"."""
    from mlflow.store.db.utils import create_sqlalchemy_engine

    from pipeline.tracking import store

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = store.tracking_uri()
    assert uri.endswith(f"?timeout={store.SQLITE_BUSY_TIMEOUT_S}")
    with create_sqlalchemy_engine(uri).connect() as connection:
        busy_ms = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
    assert busy_ms == store.SQLITE_BUSY_TIMEOUT_S * 1000

    experiment_id = store.connect("bigram")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment_id).info.run_id

    blocker = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock, as a busy worker would
    released = threading.Event()

    def release_later():
        time.sleep(2)
        released.set()
        blocker.execute("COMMIT")

    thread = threading.Thread(target=release_later)
    thread.start()
    client.log_metric(run_id, "loss", 1.0)
    assert released.is_set(), "the write went through while another process held the lock"
    thread.join()
    assert client.get_run(run_id).data.metrics["loss"] == 1.0


def test_opening_the_store_again_keeps_this_process_hold_on_it(tmp_path, monkeypatch):
    """evaluate and sample connect twice. The second time must not drop the process's SQLite
    locks: another process closing the store would then delete the WAL under this one, which
    parallel experiments met as "disk I/O error"."""
    from pipeline.tracking import store

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id = store.connect("bigram")
    client = MlflowClient(tracking_uri=store.tracking_uri())
    run_id = client.create_run(experiment_id).info.run_id  # MLflow now holds a connection
    store.connect("bigram")

    other_process = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
        "db.execute('SELECT count(*) FROM runs').fetchone(); db.close()"
    )
    subprocess.run([sys.executable, "-c", other_process, str(tmp_path / "mlflow.db")], check=True)
    assert (tmp_path / "mlflow.db-wal").exists(), "the other process took itself for the last"
    client.log_metric(run_id, "loss", 1.0)
    assert client.get_run(run_id).data.metrics["loss"] == 1.0
