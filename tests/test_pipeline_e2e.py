"""End to end: the real `dvc repro` in a throwaway git repo, corpus from a local HTTP server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import CORPUS_SHA256, FAST_TRAIN, run

pytestmark = pytest.mark.e2e


def client_for(repo: Path) -> MlflowClient:
    """A client on the copy's store; the fluent API (model loading) is pointed there too."""
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def runs_by_stage(client: MlflowClient) -> dict[str, list]:
    experiment = client.get_experiment_by_name("bigram")
    assert experiment is not None, "the pipeline did not create the 'bigram' experiment"
    grouped: dict[str, list] = {}
    for found in client.search_runs([experiment.experiment_id], order_by=["start_time ASC"]):
        grouped.setdefault(found.data.tags["stage"], []).append(found)
    return grouped


def test_dvc_repro_tracks_everything_in_mlflow(repo_copy):
    repo, env = repo_copy
    first = run(["dvc", "repro"], repo, env)
    for stage in ("download", "vocab", "train", "evaluate", "sample"):
        assert f"Running stage '{stage}'" in first.stdout

    # Stage outputs.
    assert (repo / "data/raw/input.txt").stat().st_size == 1_115_394
    assert len(json.loads((repo / "data/vocab/vocab.json").read_text())["chars"]) == 65
    curve = pd.read_csv(repo / "data/train/loss_curve.csv")
    assert curve["step"].tolist() == [0, 100, 200, 300]
    assert 4.5 < curve["train_loss"].iloc[0] < 4.9, "N(0,1) init should start near ln(65) + 0.5"
    assert curve["val_loss"].is_monotonic_decreasing
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["uniform_loss"] == pytest.approx(4.1744, abs=1e-4)
    assert metrics["train_bigram_optimum"] == pytest.approx(2.4519, abs=1e-4)
    assert metrics["train_loss"] >= metrics["train_bigram_optimum"]
    assert metrics["val_loss"] < metrics["uniform_loss"]
    assert (repo / "data/evaluate/next_char_probs.png").read_bytes()[:4] == b"\x89PNG"
    sample = (repo / "data/sample/sample.txt").read_text()
    assert len(sample) == 200

    # MLflow: one run per stage that owns one, all finished.
    client = client_for(repo)
    stages = runs_by_stage(client)
    assert {stage: len(found) for stage, found in stages.items()} == {
        "download": 1,
        "vocab": 1,
        "train": 1,
    }
    assert all(r.info.status == "FINISHED" for found in stages.values() for r in found)
    training = stages["train"][0]
    run_id = training.info.run_id
    assert json.loads((repo / "data/train/run.json").read_text())["mlflow_run_id"] == run_id

    params = training.data.params
    assert params["lr"] == str(FAST_TRAIN["lr"])
    assert params["max_iters"] == "300" and params["batch_size"] == "32"
    assert params["block_size"] == "8" and params["device"] == "auto"
    assert params["data.sha256"] == CORPUS_SHA256 and params["sample.temperature"] == "1.0"

    # The run's final metrics are exactly metrics.json's, the curve has one point per eval.
    for name, value in metrics.items():
        assert training.data.metrics[name] == pytest.approx(value, rel=1e-12), name
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted({m.step for m in history}) == [0, 100, 200, 300]

    head = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    tags = training.data.tags
    assert tags["mlflow.source.git.commit"] == head
    assert tags["device"] == "cpu" and tags["corpus_sha256"] == CORPUS_SHA256
    assert client.get_run(tags["download_run_id"]).data.tags["stage"] == "download"
    assert client.get_run(tags["vocab_run_id"]).data.tags["stage"] == "vocab"
    assert training.inputs.dataset_inputs[0].dataset.digest == CORPUS_SHA256[:16]

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss_curve.csv", "vocab.json", "metrics.json", "next_char_probs.png"} <= artifacts
    assert client.download_artifacts(run_id, "samples/sample.txt", str(repo / "dl")) is not None
    assert (repo / "dl/sample.txt").read_text() == sample

    # The logged model loads with MLflow alone and generates.
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    generated = model.generate(torch.zeros((2, 1), dtype=torch.long), 20)
    assert generated.shape == (2, 21) and int(generated.max()) < 65

    # Nothing changed: nothing reruns and no run is added.
    second = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout
    assert sum(len(found) for found in runs_by_stage(client).values()) == 3

    # DVC's own views of params, metrics and plots work on the outputs.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    assert json.dumps(shown).count("val_loss") >= 1
    run(["dvc", "params", "diff"], repo, env)
    run(["dvc", "plots", "show", "-o", str(repo / "plots")], repo, env)
    assert (repo / "plots/index.html").exists()


def test_dvc_exp_run_makes_a_named_mlflow_run(repo_copy):
    repo, env = repo_copy
    run(["dvc", "repro"], repo, env)
    result = run(["dvc", "exp", "run", "-S", "train.lr=1e-2"], repo, env)
    names = re.findall(r"Ran experiment\(s\): (\S+)", result.stdout + result.stderr)
    assert names, result.stdout
    exp_name = names[0]

    client = client_for(repo)
    trainings = runs_by_stage(client)["train"]
    assert len(trainings) == 2
    experiment_run = trainings[-1]
    assert experiment_run.info.run_name == exp_name
    assert experiment_run.data.tags["dvc.exp_name"] == exp_name
    assert experiment_run.data.params["lr"] == "0.01"
    assert experiment_run.info.status == "FINISHED"

    # `dvc exp show` lists the experiment's params and metrics beside the baseline's,
    # and its metrics are the MLflow run's.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    assert any(exp.get("name") == exp_name for exp in experiments), shown
    exp_data = next(exp for exp in experiments if exp.get("name") == exp_name)["revs"][0]["data"]
    exp_metrics = exp_data["metrics"]["data/evaluate/metrics.json"]["data"]
    assert exp_data["params"]["params.yaml"]["data"]["train"]["lr"] == pytest.approx(0.01)
    assert exp_metrics["val_loss"] == pytest.approx(experiment_run.data.metrics["val_loss"])
