"""End to end: the real `dvc repro` in a throwaway git repo, corpus from a local HTTP server.

The tests read one module-scoped copy of the suite's baseline run (conftest.trained_run); the
last one reads the suite's shared experiment (conftest.trained_experiment).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline.tracking.checkpoints import CHECKPOINT_MODEL_TYPE
from testbed import CORPUS_SHA256, FAST_TRAIN, copy_repo_with_store, free_port, run

pytestmark = pytest.mark.e2e
STAGES = ("check", "download", "vocab", "train", "evaluate", "register", "sample", "link")


@pytest.fixture(scope="module")
def reproduced(trained_run, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """The suite's one baseline `dvc repro` (conftest.trained_run), in this module's own copy,
    and that command's stdout."""
    trained, env, stdout = trained_run
    return copy_repo_with_store(trained, tmp_path_factory.mktemp("e2e") / "repo"), env, stdout


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


def test_every_stage_runs_and_writes_its_outputs(reproduced):
    repo, _, stdout = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in stdout
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
    assert metrics["val_loss"] == pytest.approx(curve["val_loss"].iloc[-1], rel=1e-12)
    assert (repo / "data/evaluate/next_char_probs.png").read_bytes()[:4] == b"\x89PNG"
    assert len((repo / "data/sample/sample.txt").read_text()) == 200


def test_mlflow_holds_params_metrics_artifacts_and_lineage(reproduced):
    repo, env, _ = reproduced
    client = client_for(repo)
    stages = runs_by_stage(client)
    assert {stage: len(found) for stage, found in stages.items()} == {
        "download": 1,
        "vocab": 1,
        "train": 1,
        "evaluate": 1,
        "register": 1,
        "sample": 1,
    }
    assert all(r.info.status == "FINISHED" for found in stages.values() for r in found)
    training = stages["train"][0]
    run_id = training.info.run_id
    assert json.loads((repo / "data/train/run.json").read_text())["mlflow_run_id"] == run_id
    for stage in ("evaluate", "register", "sample"):
        assert stages[stage][0].data.tags["mlflow.parentRunId"] == run_id

    params = training.data.params
    assert params["train.lr"] == str(FAST_TRAIN["lr"])
    assert params["train.max_iters"] == "300" and params["train.batch_size"] == "32"
    assert params["train.block_size"] == "8" and params["train.device"] == "auto"
    assert params["data.sha256"] == CORPUS_SHA256
    # Training reads no sample param: they are the served model's, on the register run.
    assert not any(name.startswith("sample.") for name in params)
    assert stages["register"][0].data.params["sample.temperature"] == "1.0"

    # The run's final metrics are exactly metrics.json's; the curve has one point per eval.
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    for name, value in metrics.items():
        assert training.data.metrics[name] == pytest.approx(value, rel=1e-12), name
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted({m.step for m in history}) == [0, 100, 200, 300]

    # The run was made before its results were committed: at the commit before HEAD.
    made_at = run(["git", "rev-parse", "HEAD~1"], repo, env).stdout.strip()
    tags = training.data.tags
    assert tags["mlflow.source.git.commit"] == made_at
    assert tags["device"] == "cpu" and tags["corpus_sha256"] == CORPUS_SHA256
    assert client.get_run(tags["download_run_id"]).data.tags["stage"] == "download"
    assert client.get_run(tags["vocab_run_id"]).data.tags["stage"] == "vocab"
    digests = {i.dataset.name: i.dataset.digest for i in training.inputs.dataset_inputs}
    assert digests["shakespeare"] == CORPUS_SHA256[:16]  # data.name
    assert {"shakespeare-train", "shakespeare-val"} <= digests.keys()

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss_curve.csv", "vocab.json", "metrics.json", "next_char_probs.png"} <= artifacts
    # Its page lists the two models register logged, and the version made of them.
    # Besides the checkpoints (test_views), of model type "checkpoint".
    outputs = {
        output.model_id
        for output in client.get_run(run_id).outputs.model_outputs
        if client.get_logged_model(output.model_id).model_type != CHECKPOINT_MODEL_TYPE
    }
    assert len(outputs) == 2
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.source.removeprefix("models:/") in outputs
    downloaded = client.download_artifacts(run_id, "samples/sample.txt", str(repo / "dl"))
    assert Path(downloaded).read_text() == (repo / "data/sample/sample.txt").read_text()


def test_logged_model_loads_with_mlflow_and_generates(reproduced):
    repo, _, _ = reproduced
    registering = runs_by_stage(client_for(repo))["register"][0]
    model = mlflow.pytorch.load_model(f"runs:/{registering.info.run_id}/model")
    generated = model.generate(torch.zeros((2, 1), dtype=torch.long), 20)
    assert generated.shape == (2, 21) and int(generated.max()) < 65


def test_unchanged_repro_runs_nothing_and_dvc_views_work(reproduced):
    repo, env, _ = reproduced
    second = run(["dvc", "repro"], repo, env)
    # Only the link stage, which DVC runs every time, and which logs nothing.
    assert re.findall(r"Running stage '(\w+)'", second.stdout) == ["link"]
    assert sum(len(found) for found in runs_by_stage(client_for(repo)).values()) == 6

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    assert "val_loss" in json.dumps(shown)
    run(["dvc", "params", "diff"], repo, env)
    run(["dvc", "plots", "show", "-o", str(repo / "plots")], repo, env)
    assert "loss_curve" in (repo / "plots/index.html").read_text()


def test_mlflow_ui_started_in_the_repo_shows_the_runs(reproduced):
    repo, env, _ = reproduced
    port = free_port()
    # No store flags: `mlflow ui` must find mlflow.db in the directory it is started from.
    server = subprocess.Popen(
        ["mlflow", "ui", "--port", str(port)],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not start in 90 s"
                time.sleep(0.5)
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=bigram"
        )
        experiment = json.load(urllib.request.urlopen(request, timeout=10))["experiment"]
        search = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.load(urllib.request.urlopen(search, timeout=10))["runs"]
        assert len(runs) == 6
        assert {r["info"]["status"] for r in runs} == {"FINISHED"}
        training_run_id = json.loads((repo / "data/train/run.json").read_text())["mlflow_run_id"]
        artifact = urllib.request.urlopen(
            f"{base}/get-artifact?path=metrics.json&run_uuid={training_run_id}",
            timeout=10,
        ).read()
        assert json.loads(artifact) == json.loads((repo / "data/evaluate/metrics.json").read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_dvc_exp_run_makes_a_named_mlflow_run(trained_experiment):
    """The shared `dvc exp run -S train.lr=0.05` (tests/conftest.py), in a copy of the trained
    repo with a new store: its one training run is named after the experiment."""
    repo, env, stdout = trained_experiment
    names = re.findall(r"Ran experiment\(s\): (\S+)", stdout)
    assert names, stdout
    exp_name = names[0]

    (experiment_run,) = runs_by_stage(client_for(repo))["train"]
    assert experiment_run.info.run_name == exp_name
    assert experiment_run.data.tags["dvc.exp_name"] == exp_name
    assert experiment_run.data.params["train.lr"] == "0.05"
    assert experiment_run.info.status == "FINISHED"

    # `dvc exp show` lists the experiment's params and metrics beside the baseline's,
    # and its metrics are the MLflow run's.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    assert any(exp.get("name") == exp_name for exp in experiments), shown
    exp_data = next(exp for exp in experiments if exp.get("name") == exp_name)["revs"][0]["data"]
    exp_metrics = exp_data["metrics"]["data/evaluate/metrics.json"]["data"]
    assert exp_data["params"]["params.yaml"]["data"]["train"]["lr"] == pytest.approx(0.05)
    for name, value in exp_metrics.items():
        assert experiment_run.data.metrics[name] == pytest.approx(value, rel=1e-12), name
