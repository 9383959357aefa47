"""Sharing experiments (issue 20): `dvc exp push` to a git remote and a DVC remote, `dvc exp pull`
in a teammate's clone, whose `dvc exp show` lists the experiment with its MLflow run id, and
that run is on the shared tracking server. The remotes are a bare repository and a folder; the
server is a real `mlflow server` on the store the experiment logged into."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow import MlflowClient

from testbed import mlflow_server, run


def exp_rows(repo: Path, env: dict) -> dict[str, dict]:
    """{experiment name: its row's data} from `dvc exp show --json`."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    return {
        experiment["name"]: experiment["revs"][0]["data"]
        for baseline in shown
        for experiment in baseline.get("experiments") or []
    }


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_teammate_pulls_an_experiment_and_finds_its_run_on_the_shared_server(
    trained_experiment, tmp_path
):
    mine, env, _ = trained_experiment
    (name,) = run(["dvc", "exp", "ls", "--name-only"], mine, env).stdout.split()
    mine_row = exp_rows(mine, env)[name]
    run_id = mine_row["params"]["data/train/run.json"]["data"]["mlflow_run_id"]

    # The team's remotes: git for the experiment's commit, DVC for its outputs.
    git_remote, dvc_remote = tmp_path / "team.git", tmp_path / "dvc-remote"
    run(
        ["git", "init", "--bare", "--quiet", "--initial-branch=main", str(git_remote)],
        tmp_path,
        env,
    )
    run(["git", "remote", "add", "origin", str(git_remote)], mine, env)
    run(["git", "push", "--quiet", "origin", "HEAD:main"], mine, env)
    run(["dvc", "remote", "add", "--local", "--default", "team", str(dvc_remote)], mine, env)
    pushed = run(["dvc", "exp", "push", "origin", name], mine, env)
    assert f"Pushed experiment {name} to Git remote 'origin'" in pushed.stdout, pushed.stdout

    theirs = tmp_path / "teammate"
    run(["git", "clone", "--quiet", str(git_remote), str(theirs)], tmp_path, env)
    run(["dvc", "remote", "add", "--local", "--default", "team", str(dvc_remote)], theirs, env)
    assert name not in exp_rows(theirs, env)
    # (DVC 3.67 says "Pulled experiment '['<name>']'": the listing below is what counts.)
    run(["dvc", "exp", "pull", "origin", name], theirs, env)

    # Their `dvc exp show` lists it with my params, metrics and MLflow run id.
    theirs_row = exp_rows(theirs, env)[name]
    for file in ("params.yaml", "data/train/run.json"):
        assert theirs_row["params"][file] == mine_row["params"][file], file
    metrics = theirs_row["metrics"]["data/evaluate/metrics.json"]["data"]
    assert metrics == mine_row["metrics"]["data/evaluate/metrics.json"]["data"]

    # The run that id names is on the shared server, with the same losses.
    with mlflow_server(f"sqlite:///{mine / 'mlflow.db'}", tmp_path, env) as url:
        found = MlflowClient(tracking_uri=url).get_run(run_id)
    assert found.info.status == "FINISHED" and found.data.tags["dvc.exp_name"] == name
    assert found.data.metrics["val_loss"] == metrics["val_loss"]

    # And its model came with it: applied, the outputs are mine, byte for byte, from the cache.
    run(["dvc", "exp", "apply", name], theirs, env)
    run(["dvc", "exp", "apply", name], mine, env)
    for output in ("data/train/model.pt", "data/evaluate/metrics.json"):
        assert md5(theirs / output) == md5(mine / output), output
