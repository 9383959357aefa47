"""A run ends by saying where to look (issue 17): the last lines a stage prints in `dvc exp run`
and `dvc repro` are the link stage's summary: the final losses beside the baselines, the MLflow
run's page, the registered version and its aliases.

Checked through what a user reads: the real `dvc exp run` and `dvc repro` output, against
metrics.json and the MLflow store's own answers (the run, the version an alias points to).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.tracking import run_record, store
from testbed import copy_trained_repo, last_stage_lines, mlflow_runs, run, run_stage

MODEL_NAME = "bigram-shakespeare"


@pytest.fixture
def experiment(trained_experiment) -> tuple[Path, dict[str, str], str]:
    return trained_experiment


def expected_summary(repo: Path) -> list[str]:
    """The summary as it must read, from metrics.json and what the store holds."""
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    vocab_size = len(json.loads((repo / "data/vocab/vocab.json").read_text())["chars"])
    (training,) = [r for r in mlflow_runs(repo) if r.data.tags.get("stage") == "train"]
    run_id, experiment_id = training.info.run_id, training.info.experiment_id
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.tags["training_run_id"] == run_id  # the first version of a new store
    assert sorted(client.get_model_version(MODEL_NAME, champion.version).aliases) == [
        "challenger",
        "champion",
    ]
    return [
        f"result: val loss {metrics['val_loss']:.4f}, train loss {metrics['train_loss']:.4f}; "
        f"uniform ln({vocab_size}) = {metrics['uniform_loss']:.4f}, "
        f"bigram optimum (train) {metrics['train_bigram_optimum']:.4f}",
        f"MLflow run: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
        "?workflowType=machine_learning",
        "  (to open it, start the UI in the repo root: "
        "mlflow ui --backend-store-uri sqlite:///mlflow.db)",
        f"registered model {MODEL_NAME} version {champion.version} @challenger @champion",
    ]


def test_a_training_experiment_ends_with_where_to_look(experiment):
    repo, _, stdout = experiment
    summary = expected_summary(repo)
    assert last_stage_lines(stdout)[-len(summary) :] == summary, stdout[-3000:]
    assert "Ran experiment(s)" in stdout.split(summary[-1])[1]  # DVC's line comes after


def test_a_no_op_repro_ends_with_the_same_summary(experiment):
    """What a user who comes back sees; tests/test_stage_imports.py checks that this path of
    the link stage imports no MLflow."""
    repo, env, _ = experiment
    summary = expected_summary(repo)
    result = run(["dvc", "repro"], repo, env)
    assert "Running stage 'train'" not in result.stdout
    assert last_stage_lines(result.stdout) == summary, result.stdout[-3000:]


def test_a_workspace_without_registered_json_looks_the_version_up(experiment):
    """As after an upgrade from a pipeline that wrote only run.json: the registry is asked."""
    repo, env, _ = experiment
    summary = expected_summary(repo)
    (repo / run_record.REGISTRATION_PATH).unlink()
    result = run_stage("link", repo, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == summary
    assert (repo / run_record.REGISTRATION_PATH).is_file()


def test_no_summary_when_no_run_holds_the_model(trained_repo, tmp_path):
    """A new store holds no run of the model: link says so, and points nowhere."""
    trained, env = trained_repo
    repo = copy_trained_repo(trained, tmp_path / "repo")
    result = run_stage("link", repo, env)
    assert result.returncode == 0, result.stderr[-3000:]
    lost, no_run = result.stdout.splitlines()
    assert "no longer holds run" in lost, result.stdout
    assert no_run.startswith("link: no training run in the MLflow store"), result.stdout


@pytest.mark.parametrize(
    ("tracking_uri", "url", "command"),
    [
        (
            "https://alice:s3cret@mlflow.example.org/team/?token=abc",
            "https://mlflow.example.org/team/#/experiments/3/runs/r1?workflowType=machine_learning",
            None,
        ),
        (
            "sqlite:///stores/team.db?timeout=60",
            "http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning",
            "mlflow ui --backend-store-uri sqlite:///stores/team.db",
        ),
        (
            "sqlite:////elsewhere/team.db",
            "http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning",
            "mlflow ui --backend-store-uri sqlite:////elsewhere/team.db",
        ),
        (
            "postgresql://bob:hunter2@db.example.org/mlflow",
            "http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning",
            "mlflow ui --backend-store-uri postgresql://bob:***@db.example.org/mlflow",
        ),
    ],
)
def test_the_run_page_of_each_kind_of_store_shows_no_password(
    tracking_uri, url, command, monkeypatch, tmp_path
):
    monkeypatch.setenv(store.TRACKING_URI_ENV, tracking_uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert store.run_page("3", "r1") == (url, command)
