"""A GPT through the real pipeline: `dvc exp run -S model.type=gpt ...` beside the bigram.

One tiny GPT experiment on a copy of the suite's baseline run (conftest.trained_repo), which the
tests only read: what the user sees in metrics.json, `dvc exp show`, MLflow's runs and registry,
and the text the generate command and the served pyfunc give.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from testbed import VENV_BIN, background, copy_repo_with_store, free_port, run
from tests.support.servers import request_json
from tests.support.store import train_runs

pytestmark = pytest.mark.e2e
# One layer of two heads, 16 channels: trains in seconds, and still sees 8 characters.
TINY_GPT = (
    "model.type=gpt",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "train.lr=3e-3",
    "train.eval_iters=4",
)
PROMPT = "ROMEO:"
GPT_OUTPUTS = ("data/train/model.pt", "data/train/loss_curve.csv")


@pytest.fixture(scope="module")
def gpt_experiment(trained_repo, tmp_path_factory) -> tuple[Path, dict[str, str], str, str]:
    """A copy of the trained repo, its store too, after one `dvc exp run` of TINY_GPT: (repo,
    env, the experiment's name, its stdout)."""
    trained, env = trained_repo
    repo = copy_repo_with_store(trained, tmp_path_factory.mktemp("gpt") / "repo")
    overrides = [arg for setting in TINY_GPT for arg in ("-S", setting)]
    result = run(["dvc", "exp", "run", "-n", "tiny-gpt", *overrides], repo, env)
    return repo, env, "tiny-gpt", result.stdout


def client_for(repo: Path) -> MlflowClient:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # for mlflow.pyfunc.load_model
    return MlflowClient(tracking_uri=uri)


def test_a_gpt_experiment_is_evaluated_exactly_against_the_same_baselines(gpt_experiment):
    repo, env, name, stdout = gpt_experiment
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["uniform_loss"] == pytest.approx(math.log(65))
    assert metrics["val_loss"] < metrics["uniform_loss"]
    assert metrics["val_bits_per_char"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert metrics["train_bigram_optimum"] == pytest.approx(2.4519, abs=1e-4)
    assert "registered model gpt-shakespeare version 1 @challenger @champion" in stdout

    # The loss curve has both splits at every eval point, as the bigram's.
    curve = pd.read_csv(repo / "data/train/loss_curve.csv")
    assert list(curve.columns) == ["step", "train_loss", "val_loss"]
    assert curve["step"].tolist() == [0, 100, 200, 300]
    assert curve["val_loss"].iloc[-1] < curve["val_loss"].iloc[0]

    # `dvc exp show` compares it with the bigram baseline by the same params and metrics.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    revs = {
        (exp.get("name") or "baseline"): exp["revs"][0]["data"]
        for baseline in shown
        for exp in [baseline, *(baseline.get("experiments") or [])]
        if exp.get("revs")
    }
    params = revs[name]["params"]["params.yaml"]["data"]["model"]
    assert params == {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    assert revs[name]["metrics"]["data/evaluate/metrics.json"]["data"] == metrics


def test_mlflow_records_the_gpt_by_its_params_and_says_how_its_curve_was_measured(
    gpt_experiment,
):
    repo, _, name, _ = gpt_experiment
    bigram, gpt = train_runs(repo)
    assert gpt.info.run_name == name and gpt.info.status == "FINISHED"
    assert {key: gpt.data.params[key] for key in gpt.data.params if key.startswith("model.")} == {
        "model.type": "gpt",
        "model.n_layer": "1",
        "model.n_head": "2",
        "model.n_embd": "16",
        "model.dropout": "0.0",
    }
    assert gpt.data.params["train.eval_iters"] == "4"
    note = gpt.data.tags["mlflow.note.content"]  # the run's description, on its page
    assert note.startswith("Loss curve: the lecture's estimate, the mean of 4 random batches")
    # The bigram's run names no GPT size, and its curve is exact.
    assert [key for key in bigram.data.params if key.startswith("model.")] == ["model.type"]
    assert bigram.data.tags["mlflow.note.content"].startswith("Loss curve: exact, every bigram")
    # evaluate's exact losses are the run's latest, as `dvc exp show` shows them.
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert gpt.data.metrics["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-12)


def test_each_family_has_its_own_registered_model_and_champion(gpt_experiment):
    repo, _, _, _ = gpt_experiment
    client = client_for(repo)
    gpt = client.get_model_version_by_alias("gpt-shakespeare", "champion")
    bigram = client.get_model_version_by_alias("bigram-shakespeare", "champion")
    assert str(gpt.version) == "1" and str(bigram.version) == "1"
    assert gpt.description.startswith("GPT (1 layers, 2 heads, n_embd 16) of training run ")
    assert bigram.description.startswith("Bigram model of training run ")
    assert gpt.tags["model.type"] == "gpt" and gpt.tags["model.n_embd"] == "16"


def generate(repo: Path, env: dict[str, str], model: str, *flags: str) -> str:
    command = [sys.executable, "-m", "pipeline.generate", "--model", model]
    args = ["--prompt", PROMPT, "--chars", "40", "--seed", "3", *flags]
    result = subprocess.run(
        [*command, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def test_every_form_of_the_gpt_generates_the_same_text(gpt_experiment):
    """The registered pyfunc (through the generate command and through MLflow's own loader,
    as `mlflow models serve` runs it), the PyTorch flavour and model.pt in the workspace."""
    repo, env, _, _ = gpt_experiment
    client = client_for(repo)
    registered = generate(repo, env, "models:/gpt-shakespeare@champion")
    assert registered.startswith(PROMPT) and len(registered) == len(PROMPT) + 40

    gpt_run = train_runs(repo)[-1]
    (register,) = client.search_runs(
        [gpt_run.info.experiment_id],
        f"tags.stage = 'register' and tags.mlflow.parentRunId = '{gpt_run.info.run_id}'",
    )
    assert generate(repo, env, f"runs:/{register.info.run_id}/model") == registered
    assert generate(repo, env, "data/train/model.pt") == registered

    served = mlflow.pyfunc.load_model("models:/gpt-shakespeare@champion")
    request = pd.DataFrame({"prompt": [PROMPT], "chars": [40], "seed": [3]})
    assert served.predict(request) == [registered]
    # top_k, off by default, is a column of the request and a flag of the command.
    greedy = generate(repo, env, "models:/gpt-shakespeare@champion", "--top-k", "1")
    assert greedy != registered
    assert served.predict(request.assign(top_k=[1], seed=[4])) == [greedy]


def test_mlflow_models_serve_answers_from_the_gpt_champion(gpt_experiment):
    """The registered GPT behind a real `mlflow models serve`: over HTTP it gives the text of
    MLflow's loader, seeded, with top_k as a column, and refuses a bad field with HTTP 400."""
    repo, env, _, _ = gpt_experiment
    client_for(repo)
    expected = mlflow.pyfunc.load_model("models:/gpt-shakespeare@champion").predict(
        pd.DataFrame(
            {"prompt": [PROMPT, PROMPT], "chars": [30, 30], "seed": [5, 5], "top_k": [0, 3]}
        )
    )
    port = free_port()
    serve_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    serve = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/gpt-shakespeare@champion"]
    serve += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with background(serve, f"http://127.0.0.1:{port}/ping", repo / "serve.log", serve_env):
        url = f"http://127.0.0.1:{port}/invocations"
        records = [
            {"prompt": PROMPT, "chars": 30, "seed": 5, "top_k": 0},
            {"prompt": PROMPT, "chars": 30, "seed": 5, "top_k": 3},
        ]
        status, body = request_json(url, {"dataframe_records": records})
        assert status == 200, body
        assert json.loads(body)["predictions"] == list(expected)
        assert expected[0] != expected[1]
        status, body = request_json(url, {"dataframe_records": [{"prompt": 5}]})
        assert status == 400 and "prompt must be a string" in json.loads(body)["message"]


def test_training_the_gpt_again_gives_the_same_bytes(gpt_experiment, tmp_path):
    """On the CPU a GPT is as reproducible as the bigram: the train stage, forced to run again
    on the experiment's params, writes a byte-identical model.pt and loss curve."""
    repo, env, _, _ = gpt_experiment
    copy = copy_repo_with_store(repo, tmp_path / "repo")
    before = {path: (copy / path).read_bytes() for path in GPT_OUTPUTS}
    run(["dvc", "repro", "--force", "--single-item", "train"], copy, env)
    assert {path: (copy / path).read_bytes() for path in GPT_OUTPUTS} == before
