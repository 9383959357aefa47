"""Running DVC experiments from tests and checking what they left in MLflow."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from testbed import run

MODEL_NAME = "bigram-shakespeare"
POLL_S = 2
STATUS_EVERY_S = 20
QUEUE_TIMEOUT_S = 900


def queue(repo: Path, env: dict[str, str], overrides: list[str]) -> dict[str, str]:
    """Queue one experiment per override; returns {experiment name: override}."""
    names = {}
    for override in overrides:
        result = run(["dvc", "exp", "run", "--queue", "-S", override], repo, env)
        names[re.search(r"Queued experiment '([^']+)'", result.stdout).group(1)] = override
    return names


def queue_grid(repo: Path, env: dict[str, str], axes: list[str]) -> list[str]:
    """`dvc exp run --queue -S 'train.lr=1e-3,1e-2' -S ...`: DVC's grid, one experiment per
    combination of the axes' values; returns their names."""
    options = [arg for axis in axes for arg in ("-S", axis)]
    result = run(["dvc", "exp", "run", "--queue", *options], repo, env)
    return re.findall(r"Queued experiment '([^']+)'", result.stdout)


def start_queue(repo: Path, env: dict[str, str], jobs: int) -> None:
    """`dvc queue start -j <jobs>`, returning once the workers are started.

    Its output goes to a file, not a pipe: the workers' launcher (dvc-task's daemon process,
    forked from `dvc`) keeps the fds it inherited until its worker ends, so a reader of a pipe
    would wait for the whole queue.
    """
    log = repo / ".dvc" / "tmp" / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        started = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
    assert started.returncode == 0, log.read_text()[-3000:]


def wait_for_queue(repo: Path, env: dict[str, str], experiments: int) -> str:
    """Wait until the queue is idle; returns `dvc queue status`.

    Finished experiments show up as git refs, cheap to count on a loaded machine; `dvc queue
    status` is asked now and then, in case one failed and will never show up.
    """
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    next_status_check = time.monotonic() + STATUS_EVERY_S
    while True:
        done = time.monotonic() > next_status_check or exp_refs(repo) >= experiments
        if done:
            status = run(["dvc", "queue", "status"], repo, env).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                return status
            next_status_check = time.monotonic() + STATUS_EVERY_S
        assert time.monotonic() < deadline, f"queue still busy after {QUEUE_TIMEOUT_S} s"
        time.sleep(POLL_S)


def failed_task_logs(repo: Path, env: dict[str, str], status: str) -> str:
    """The end of `dvc queue logs` of every failed task in a `dvc queue status` table."""
    failed = [line.split()[1] for line in status.splitlines() if line.rstrip().endswith("Failed")]
    logs = [run(["dvc", "queue", "logs", name], repo, env, check=False).stdout for name in failed]
    return "\n".join(f"--- {name}\n{log[-3000:]}" for name, log in zip(failed, logs, strict=True))


def exp_refs(repo: Path) -> int:
    refs = subprocess.run(
        ["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True
    ).stdout
    return len(refs.splitlines())


def exp_show(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """{experiment name: {"params": train params, "metrics": metrics.json}} from `dvc exp show`."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            found[experiment["name"]] = {
                "params": data["params"]["params.yaml"]["data"]["train"],
                "metrics": data["metrics"]["data/evaluate/metrics.json"]["data"],
            }
    return found


def training_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("bigram")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'train'")


def check_experiments_in_store(
    client: MlflowClient, repo: Path, env: dict[str, str], names: dict[str, str]
) -> list:
    """Each experiment has exactly one FINISHED training run, named after it, whose params and
    metrics are those `dvc exp show` lists for it; returns those runs. An experiment's entry
    in names is its overrides, ``train.lr=3e-3`` or several with spaces between."""
    runs = [r for r in training_runs(client) if r.data.tags.get("dvc.exp_name") in names]
    assert sorted(r.data.tags["dvc.exp_name"] for r in runs) == sorted(names), "lost or doubled"
    shown = exp_show(repo, env)
    for found in runs:
        name = found.data.tags["dvc.exp_name"]
        assert found.info.status == "FINISHED", name
        assert found.info.run_name == name
        for override in names[name].split():
            param, value = override.split("=")
            assert float(found.data.params[param]) == float(value), name
            shown_value = shown[name]["params"][param.removeprefix("train.")]
            assert shown_value == pytest.approx(float(value)), name
        metrics = shown[name]["metrics"]
        assert metrics.keys() <= found.data.metrics.keys()
        for metric, value in metrics.items():
            assert found.data.metrics[metric] == pytest.approx(value, rel=1e-12), (name, metric)
    return runs


def check_registry(client: MlflowClient, runs: list) -> None:
    """One model version per training, numbered without gaps or repeats, metrics attached."""
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    by_run = {version.tags["training_run_id"]: version for version in versions}
    assert sorted(int(v.version) for v in versions) == list(range(1, len(versions) + 1))
    for found in runs:
        version = by_run[found.info.run_id]
        assert version.tags["dvc.exp_name"] == found.data.tags["dvc.exp_name"]
        assert float(version.tags["val_loss"]) == pytest.approx(
            found.data.metrics["val_loss"], abs=1e-6
        )
        assert f"val_loss {found.data.metrics['val_loss']:.4f}" in version.description


@dataclass(frozen=True)
class Experiments:
    """A copy of the trained repo after three `dvc exp run`s (conftest.experiments)."""

    repo: Path
    env: dict
    first: str  # train.lr=0.05
    second: str  # train.lr=0.005
    restored: str  # train.lr=0.05 again: DVC restored every stage from its run-cache
    restored_stdout: str
