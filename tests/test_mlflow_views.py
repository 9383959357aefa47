"""MLflow opens on what this project is (issue 17): a model-training experiment, runs named for
what they are, and the rebuild record in one artifact rather than a column per dep. Every check
reads the store through MLflow's client, as the UI reads it through the same API."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ruamel.yaml import YAML

from pipeline.tracking.rebuild import DEPS_TAG
from pipeline.tracking.store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from pipeline.tracking.system_metrics import PREFIX as SYSTEM_PREFIX
from testbed import mlflow_runs, run, run_stage, update_params
from tests.support.store import CPU_SYSTEM_METRICS, client_for, recorded_deps

EXPERIMENT = "bigram"
# Tags MLflow's runs table shows as columns: all but its own `mlflow.*` ones. Measured on the
# trained repo: 22 over all its runs (45 when each of the 24 train deps was a `dvc.deps.<path>`
# tag).
MAX_TAG_COLUMNS = 22


def runs_by_stage(repo: Path) -> dict[str, list]:
    runs: dict[str, list] = {}
    for found in mlflow_runs(repo):
        runs.setdefault(found.data.tags.get("stage"), []).append(found)
    return runs


def test_the_experiment_is_a_model_training_experiment(trained_repo):
    repo, _ = trained_repo
    experiment = client_for(repo).get_experiment_by_name(EXPERIMENT)
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND


def test_an_existing_experiment_of_another_kind_becomes_a_model_training_one(prepared_copy):
    """A store made before the kind was set, or an experiment a user switched to GenAI."""
    repo, env = prepared_copy
    client = client_for(repo)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")

    assert run_stage("download", repo, env).returncode == 0

    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_every_run_of_a_repro_is_named_for_what_it_is(trained_repo):
    repo, env = trained_repo
    # The fixture's run was made before its final commit.
    commit = run(["git", "rev-parse", "--short", "HEAD~1"], repo, env).stdout.strip()
    names = {stage: [r.info.run_name for r in runs] for stage, runs in runs_by_stage(repo).items()}
    assert names == {
        "download": ["download shakespeare"],
        "vocab": ["vocab shakespeare"],
        "train": [f"main@{commit}"],
        "evaluate": [f"evaluate of main@{commit}"],
        "register": [f"register of main@{commit}"],
        "sample": [f"sample of main@{commit}"],
    }


def test_runs_on_another_corpus_name_it(prepared_copy):
    """A training on the user's own text is not named like the Shakespeare one of the commit."""
    repo, env = prepared_copy
    update_params(repo, data={"name": "lunyu"})
    for stage in ("download", "train"):
        assert run_stage(stage, repo, env).returncode == 0
    commit = run(["git", "rev-parse", "--short", "HEAD"], repo, env).stdout.strip()
    runs = runs_by_stage(repo)
    assert runs["download"][-1].info.run_name == "download lunyu"
    assert [r.info.run_name for r in runs["train"]] == [f"main@{commit} (lunyu)"]


def test_a_training_run_records_its_deps_in_one_artifact_not_as_columns(trained_repo):
    repo, _ = trained_repo
    client = client_for(repo)
    (training,) = runs_by_stage(repo)["train"]
    tags = training.data.tags
    assert not [key for key in tags if key.startswith("dvc.deps.")]

    deps, data = recorded_deps(client, training.info.run_id)
    lock = YAML(typ="safe").load(repo / "dvc.lock")["stages"]["train"]["deps"]
    assert deps == {dep["path"]: dep["md5"] for dep in lock}
    assert tags[DEPS_TAG] == hashlib.sha256(data).hexdigest()
    # What users compare stays a metric.
    assert {"train_loss", "val_loss"} <= training.data.metrics.keys()

    columns = {
        key for r in mlflow_runs(repo) for key in r.data.tags if not key.startswith("mlflow.")
    }
    assert len(columns) <= MAX_TAG_COLUMNS, sorted(columns)


def test_the_training_run_alone_has_system_metrics_which_no_model_carries(trained_repo):
    """MLflow's System metrics tab of the training run charts them; the stages around it, a
    second or less each, would only add columns to the runs table's picker."""
    repo, _ = trained_repo
    client = client_for(repo)
    for found in mlflow_runs(repo):
        stage = found.data.tags["stage"]
        system = {key for key in found.data.metrics if key.startswith(SYSTEM_PREFIX)}
        assert system >= CPU_SYSTEM_METRICS if stage == "train" else system == set(), stage
    (training,) = runs_by_stage(repo)["train"]
    history = client.get_metric_history(training.info.run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == list(range(len(history)))
    for model in client.search_logged_models([training.info.experiment_id]):
        assert not [m.key for m in model.metrics if m.key.startswith(SYSTEM_PREFIX)], model.name


def test_the_leaderboard_lists_the_pipelines_training_run_with_its_exact_losses(trained_repo):
    repo, env = trained_repo
    (training,) = runs_by_stage(repo)["train"]
    result = run([sys.executable, "-m", "pipeline.leaderboard"], repo, env)
    header, _, row = (
        [c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
    )
    cells = dict(zip(header, row, strict=True))
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert cells["run"] == training.info.run_name
    assert cells["model"] == "bigram" and cells["parameters"] == "4,225"
    assert cells["val loss"] == f"**{metrics['val_loss']:.4f}**"
    assert cells["train loss"] == f"{metrics['train_loss']:.4f}"
    assert training.info.run_id in cells["run page"]
