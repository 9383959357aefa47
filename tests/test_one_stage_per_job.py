"""One stage per job (issue 17): serving never retrains, and every training run that `dvc exp
show` names carries evaluate's metrics.

Checked through what a user reads: the stages `dvc exp run` and `dvc repro` print as they run,
the MLflow runs and registered versions the store answers with, and the link stage's summary.
Both tests start from the shared trained experiment (tests/conftest.py), each in a copy of its
own, MLflow store included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline import paths
from pipeline.files import file_sha256
from testbed import copy_repo_with_store, last_stage_lines, mlflow_runs, run
from tests.support.store import client_for, model_metrics

MODEL_NAME = "bigram-shakespeare"


def stages_run(stdout: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", stdout)


def runs_of(repo: Path, stage: str) -> list:
    return [found for found in mlflow_runs(repo) if found.data.tags.get("stage") == stage]


def test_a_sample_param_registers_a_new_version_without_training(trained_experiment, tmp_path):
    repo = copy_repo_with_store(trained_experiment[0], tmp_path / "repo")
    env = trained_experiment[1]
    trainings_before = [found.info.run_id for found in runs_of(repo, "train")]
    versions_before = client_for(repo).search_model_versions(f"name = '{MODEL_NAME}'")

    result = run(["dvc", "exp", "run", "-S", "sample.temperature=0.8"], repo, env)

    assert stages_run(result.stdout) == ["check", "register", "sample", "link"], result.stdout
    assert [found.info.run_id for found in runs_of(repo, "train")] == trainings_before
    client = client_for(repo)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == len(versions_before) + 1
    newest = max(versions, key=lambda version: int(version.version))
    # The same weights, from the same training run, with the new defaults.
    defaults = json.loads((repo / paths.SAMPLING_DEFAULTS_PATH).read_text())
    assert defaults["temperature"] == 0.8
    assert newest.tags["sampling_defaults_sha256"] == file_sha256(
        repo / paths.SAMPLING_DEFAULTS_PATH
    )
    assert newest.tags["model_sha256"] == file_sha256(repo / paths.MODEL_PATH)
    assert newest.tags["training_run_id"] == trainings_before[-1]
    # The version's run is the training run; its model was logged by the new register run.
    assert newest.run_id == trainings_before[-1]
    register = client.get_run(
        client.get_logged_model(newest.source.removeprefix("models:/")).source_run_id
    )
    assert register.data.tags["stage"] == "register"
    assert register.data.params["sample.temperature"] == "0.8"
    assert register.data.tags["mlflow.parentRunId"] == trainings_before[-1]
    assert last_stage_lines(result.stdout)[-1] == (
        f"registered model {MODEL_NAME} version {newest.version} @challenger"
    )


def test_a_retraining_to_the_same_weights_gets_evaluates_metrics(trained_experiment, tmp_path):
    """A change to training code that does not change the result: DVC reruns train, whose
    outputs come out byte for byte the same, and so skips evaluate and register. The new
    training run, which run.json (and `dvc exp show`) now names, still shows every metric of
    metrics.json, and the summary names the version that serves these weights."""
    repo = copy_repo_with_store(trained_experiment[0], tmp_path / "repo")
    env = trained_experiment[1]
    training_py = repo / "pipeline/lm/training.py"
    training_py.write_text(training_py.read_text() + "\n# a comment changes no result\n")

    result = run(["dvc", "repro"], repo, env)

    assert stages_run(result.stdout) == ["train", "link"], result.stdout
    first, second = runs_of(repo, "train")
    run_id = json.loads((repo / paths.RUN_INFO_PATH).read_text())["mlflow_run_id"]
    assert run_id == second.info.run_id
    metrics = json.loads((repo / paths.METRICS_PATH).read_text())
    second_run = client_for(repo).get_run(run_id)
    logged = second_run.data.metrics
    # The same model metrics; the system metrics are each training's own.
    assert model_metrics(second_run) == model_metrics(first)
    assert {name: logged[name] for name in metrics} == metrics
    artifacts = {artifact.path for artifact in client_for(repo).list_artifacts(run_id)}
    assert {"metrics.json", "next_char_probs.png"} <= artifacts
    (version,) = client_for(repo).search_model_versions(f"name = '{MODEL_NAME}'")
    assert last_stage_lines(result.stdout)[-1] == (
        f"registered model {MODEL_NAME} version {version.version} @challenger @champion"
    )
