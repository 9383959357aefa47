"""A rejected experiment changes nothing: the check stage (pipeline/stages/check.py) refuses a bad
param before DVC removes any stage's outputs, whichever stage reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from testbed import copy_trained_repo, mlflow_runs, run, update_params

pytestmark = pytest.mark.e2e

# (override, the start of the one error line): params of each stage, checked by their rules
# alone or, for data.max_vocab_size, data.train_fraction and train.block_size, against the
# corpus (65 distinct characters, 1,115,394 of them).
REJECTED = (
    (
        "train.batch_size=100000000000",
        "error: params.yaml: param 'train.batch_size' must be at most",
    ),
    ("train.block_size=200000", "error: param 'train.block_size' must be shorter than the smaller"),
    ("data.max_vocab_size=10", "error: the corpus has 65 distinct characters, above data.max_voc"),
    (
        "data.train_fraction=0.9999999",
        "error: data/raw/input.txt is too short (1115394 characters)",
    ),
    ("sample.temperature=0", "error: params.yaml: param 'sample.temperature' must be a finite"),
    ("tracking.registered_model_name=a/b", "error: params.yaml: param 'tracking.registered_mo"),
)


def workspace_state(repo: Path, env: dict[str, str]) -> dict:
    """Every output dvc.lock names, byte for byte, and what `dvc status` says of the stages."""
    lock = YAML(typ="safe", pure=True).load(repo / "dvc.lock")["stages"]
    outputs = {
        out["path"]: (repo / out["path"]).read_bytes()
        for stage in lock.values()
        for out in stage.get("outs", [])
    }
    status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
    return {
        "outputs": outputs,
        "status": status,
        "dvc.lock": (repo / "dvc.lock").read_bytes(),
        "git status": run(["git", "status", "--porcelain"], repo, env).stdout,
    }


@pytest.fixture(scope="module")
def trained_copy(trained_repo, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    trained, env = trained_repo
    return copy_trained_repo(trained, tmp_path_factory.mktemp("rejected") / "repo"), env


@pytest.mark.parametrize("override,error", REJECTED, ids=[o for o, _ in REJECTED])
def test_a_rejected_experiment_leaves_every_output_as_it_was(trained_copy, override, error):
    repo, env = trained_copy
    before = workspace_state(repo, env)
    committed_params = (repo / "params.yaml").read_bytes()
    runs_before = len(mlflow_runs(repo))

    result = run(["dvc", "exp", "run", "-S", override], repo, env, check=False)

    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith(error), result.stderr[-2000:]
    assert "Running stage 'check'" in result.stdout
    assert "Running stage 'download'" not in result.stdout
    # DVC leaves the experiment's value in params.yaml, as after any failed `dvc exp run`; with
    # the file restored, `dvc status` and every output are exactly as before.
    (repo / "params.yaml").write_bytes(committed_params)
    assert workspace_state(repo, env) == before
    assert len(mlflow_runs(repo)) == runs_before


def test_a_param_typed_wrongly_into_params_yaml_stops_dvc_repro_first(trained_copy):
    repo, env = trained_copy
    before = workspace_state(repo, env)
    params = repo / "params.yaml"
    committed = params.read_text()
    params.write_text(committed.replace("  lr: 0.02", "  lr: fast"))
    try:
        result = run(["dvc", "repro"], repo, env, check=False)
    finally:
        params.write_text(committed)

    assert result.returncode != 0
    assert "error: params.yaml: param 'train.lr' must be a number, got 'fast'" in result.stderr
    assert workspace_state(repo, env) == before


def test_a_valid_change_reruns_only_what_reads_it(trained_copy):
    """The check's output holds the same bytes for any valid params: download and vocab are not
    rerun for a training param."""
    repo, env = trained_copy
    committed_params = (repo / "params.yaml").read_bytes()
    update_params(repo, train={"lr": 0.03})
    try:
        # Dry: in the workspace, as `dvc exp run --dry` fails before any stage in DVC 3.
        result = run(["dvc", "repro", "--dry"], repo, env)
    finally:
        (repo / "params.yaml").write_bytes(committed_params)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if "Running stage" in line}
    assert ran >= {"check", "train"} and not ran & {"download", "vocab"}, result.stdout
