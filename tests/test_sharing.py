"""Sharing and rebuilding: a DVC remote carries data and models between clones, and a training
run's record is enough to rebuild it with identical metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from ruamel.yaml import YAML

from pipeline.params import TrainParams
from pipeline.tracking.rebuild import DEPS_TAG
from testbed import commit_all, copy_trained_repo, run, run_stage, update_params
from tests.support.faults import files_holding
from tests.support.store import CPU_SYSTEM_METRICS, client_for, model_metrics, recorded_deps

pytestmark = pytest.mark.e2e


def training_run(repo: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bigram")
    (found,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    return found


@pytest.mark.parametrize("remote", ["folder", "s3"])
def test_dvc_remote_moves_data_and_model_to_another_clone(trained_repo, tmp_path, remote, request):
    """`dvc push` from one clone, `dvc pull` into another: nothing is left to run there. The
    remote is a folder, or a bucket of an S3 server (dvc-s3, `endpointurl`), whose credentials
    come from the AWS variables and are written nowhere."""
    source, env = copy_trained_repo(trained_repo[0], tmp_path / "source"), trained_repo[1]
    if remote == "folder":
        run(["dvc", "remote", "add", "--default", "shared", str(tmp_path / "remote")], source, env)
    else:
        s3 = request.getfixturevalue("s3")
        bucket = s3.new_bucket("dvc-remote-test")
        env = {**env, **s3.credentials}
        run(["dvc", "remote", "add", "--default", "shared", f"s3://{bucket}/bigram"], source, env)
        run(["dvc", "remote", "modify", "shared", "endpointurl", s3.endpoint], source, env)
    commit_all(source, env, "share data through a DVC remote")
    pushed = run(["dvc", "push"], source, env)
    if remote == "s3":
        model_md5 = hashlib.md5((source / "data/train/model.pt").read_bytes()).hexdigest()
        assert f"bigram/files/md5/{model_md5[:2]}/{model_md5[2:]}" in s3.keys(bucket)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(source), str(clone)], tmp_path, env)
    assert not (clone / "data/train/model.pt").exists()  # only metrics.json comes with git
    run(["dvc", "pull"], clone, env)
    # Only the link stage, which runs every time, is not up to date.
    assert json.loads(run(["dvc", "status", "--json"], clone, env).stdout) == {
        "link": ["always changed"]
    }
    ran = run(["dvc", "repro"], clone, env).stdout
    assert re.findall(r"Running stage '(\w+)'", ran) == ["link"]
    for output in ("data/train/model.pt", "data/evaluate/metrics.json", "data/raw/input.txt"):
        assert (clone / output).read_bytes() == (source / output).read_bytes(), output

    # The model is a DVC artifact (dvc.yaml's artifacts:): a git tag names a version of it,
    # which `dvc artifacts get` fetches by name from the remote.
    run(["git", "tag", "-a", "bigram-shakespeare@v1.0.0", "-m", "first model"], source, env)
    run(
        ["dvc", "artifacts", "get", str(source), "bigram-shakespeare", "-o", "model.pt"],
        tmp_path,
        env,
    )
    assert (tmp_path / "model.pt").read_bytes() == (source / "data/train/model.pt").read_bytes()
    if remote == "s3":
        outputs = [pushed.stdout, pushed.stderr, ran]
        assert not [text for text in outputs if s3.secret_key in text]
        assert not files_holding(s3.secret_key, source, clone)


def test_a_training_run_is_rebuilt_from_its_record(trained_repo, tmp_path):
    """Check out the run's commit, set its params, `dvc repro`: the same metrics, exactly."""
    repo, env = trained_repo
    original = training_run(repo)
    tags, params = original.data.tags, original.data.params

    # The record: commit and dirt (the fixture ran with an uncommitted params change),
    # the train stage's input hashes as dvc.lock has them (rebuild/deps.json), versions, device.
    assert tags["git.dirty"] == "true" and tags["git.changed_files"] == "params.yaml"
    lock = YAML(typ="safe").load(repo / "dvc.lock")["stages"]["train"]["deps"]
    recorded, _ = recorded_deps(client_for(repo), original.info.run_id)
    assert recorded == {dep["path"]: dep["md5"] for dep in lock}
    assert tags["version.python"] == platform.python_version()
    assert tags["version.torch"] == torch.__version__
    assert tags["version.dvc"] == importlib.metadata.version("dvc")
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["device.name"]

    rebuild = tmp_path / "rebuild"
    run(["git", "clone", "-q", str(repo), str(rebuild)], tmp_path, env)
    run(["git", "checkout", "-q", tags["mlflow.source.git.commit"]], rebuild, env)
    field_types = {field.name: field.type for field in dataclasses.fields(TrainParams)}
    casts = {"int": int, "float": float, "str": str}
    update_params(
        rebuild,
        train={name: casts[kind](params[f"train.{name}"]) for name, kind in field_types.items()},
    )
    run(["dvc", "repro"], rebuild, env)

    rebuilt = training_run(rebuild)
    assert model_metrics(rebuilt) == model_metrics(original)
    assert rebuilt.data.metrics.keys() >= CPU_SYSTEM_METRICS  # this machine's, not the same
    # The same inputs, byte for byte: no run id or path of one machine enters them.
    assert recorded_deps(client_for(rebuild), rebuilt.info.run_id)[0] == recorded
    assert rebuilt.data.tags[DEPS_TAG] == tags[DEPS_TAG]
    weights = [torch.load(r / "data/train/model.pt", weights_only=True) for r in (repo, rebuild)]
    assert torch.equal(*(w["token_embedding_table.weight"] for w in weights))


def test_the_link_stage_rewrites_a_run_json_whose_run_the_store_lost(trained_repo, tmp_path):
    """mlflow.db deleted (a copy without it): run.json must not go on naming a run that no
    longer exists. Before, the link stage's fast path kept the dangling id."""
    repo = copy_trained_repo(trained_repo[0], tmp_path / "repo")
    run_info = repo / "data/train/run.json"
    lost_run = json.loads(run_info.read_text())["mlflow_run_id"]
    assert lost_run and not (repo / "mlflow.db").exists()

    linked = run_stage("link", repo, trained_repo[1])

    assert linked.returncode == 0, linked.stderr
    assert f"no longer holds run {lost_run}" in linked.stdout
    assert "no training run in the MLflow store" in linked.stdout
    assert json.loads(run_info.read_text())["mlflow_run_id"] is None
