"""A train stage SIGKILLed at a random step resumes from its checkpoint at the next `dvc repro`
and ends with the bytes of the run that was never killed; MLflow tells the story truthfully.

One scenario, three real trainings of a small GPT with dropout (so that torch's global generator
is part of the state) in a repo copy: uninterrupted, killed, resumed. train.keep: best, so that
the best point survives the kill too; the best val loss is at step 900 of 1100.
"""

from __future__ import annotations

import os
import random
import signal
import time
import urllib.parse
from pathlib import Path

import pytest

from pipeline.paths import CHECKPOINT_DIR, LOSS_CURVE_PATH, MODEL_PATH
from pipeline.tracking.checkpoints import (
    CHECKPOINT_MODEL_TYPE,
    KEPT_STEP_TAG,
    RESUMED_FROM_RUN_TAG,
    RESUMED_FROM_STEP_TAG,
)
from testbed import run, update_params
from tests.support.stages import start_and_wait_for_training
from tests.support.store import client_for, train_runs

SMALL_GPT = {"type": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.1}
TRAIN = {
    "block_size": 16,
    "batch_size": 16,
    "max_iters": 1100,
    "eval_interval": 100,
    "eval_iters": 4,
    "lr": 0.01,
    "keep": "best",
}
EVAL_STEPS = list(range(0, 1101, 100))
BEST_STEP = 900


def checkpoint_models(client, run) -> dict[int, object]:
    """{step: logged model} of a run's checkpoints."""
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    return {int(m.name.split("-")[1]): m for m in models if m.model_type == CHECKPOINT_MODEL_TYPE}


def weights_of(model) -> bytes:
    """The model.pt a checkpoint's logged model holds."""
    return (Path(urllib.parse.urlparse(model.artifact_location).path) / "model.pt").read_bytes()


def kill_training_after(cmd: list[str], repo: Path, env: dict, step: int, delay_s: float) -> None:
    """Start cmd, SIGKILL its process group delay_s after the eval point `step` has been
    printed (its checkpoint written), as a power cut would."""
    process = start_and_wait_for_training(cmd, repo, env, step)
    time.sleep(delay_s)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the training ended before the kill"


@pytest.mark.e2e
def test_a_sigkilled_training_resumes_from_its_checkpoint_and_ends_with_the_same_bytes(
    prepared_copy,
):
    repo, env = prepared_copy
    update_params(repo, model=SMALL_GPT, train=TRAIN)
    client = client_for(repo)
    rng = random.Random()
    killed_after, delay_s = rng.choice(EVAL_STEPS[1:8]), rng.uniform(0, 0.5)
    scenario = f"killed {delay_s:.2f} s after step {killed_after}"

    kill_training_after(["dvc", "repro", "train"], repo, env, killed_after, delay_s)
    status = run(["git", "status", "--porcelain"], repo, env).stdout
    assert "checkpoints" not in status, "checkpoints are not for git"
    resumed_stdout = run(["dvc", "repro", "train"], repo, env).stdout
    resumed_model = (repo / MODEL_PATH).read_bytes()
    resumed_curve = (repo / LOSS_CURVE_PATH).read_bytes()
    assert list((repo / CHECKPOINT_DIR).iterdir()) == [], "a completed run keeps no checkpoint"
    # The same training, never killed: forced, since DVC's run-cache has its outputs now.
    run(["dvc", "repro", "--force", "train"], repo, env)

    killed, resumed, uninterrupted = train_runs(repo)
    assert (killed.info.status, resumed.info.status) == ("KILLED", "FINISHED"), scenario
    assert resumed_model == (repo / MODEL_PATH).read_bytes(), scenario
    assert resumed_curve == (repo / LOSS_CURVE_PATH).read_bytes(), scenario

    # What the killed run logged: its checkpoints up to the kill, none left PENDING.
    kept = checkpoint_models(client, killed)
    ready = sorted(step for step, model in kept.items() if model.status.name == "READY")
    assert ready == EVAL_STEPS[1 : 1 + len(ready)] and ready[-1] >= killed_after, scenario
    assert all(model.status.name in ("READY", "FAILED") for model in kept.values())
    # The resumed run names where it started: the last checkpoint written, logged or not yet.
    from_step = int(resumed.data.tags[RESUMED_FROM_STEP_TAG])
    assert from_step in (ready[-1], ready[-1] + 100), scenario
    assert resumed.data.tags[RESUMED_FROM_RUN_TAG] == killed.info.run_id
    assert f"step {from_step} of run {killed.info.run_id}" in resumed_stdout
    assert (
        f"Resumed from step {from_step} of run {killed.info.run_id}"
        in (resumed.data.tags["mlflow.note.content"])
    )
    # Its curve is whole: every eval point once, with the uninterrupted run's values.
    for name in ("train_loss", "val_loss"):
        history = client.get_metric_history(resumed.info.run_id, name)
        assert [m.step for m in history] == EVAL_STEPS, f"{name}: no gap, no duplicate"
        expected = client.get_metric_history(uninterrupted.info.run_id, name)
        assert [m.value for m in history] == [m.value for m in expected], scenario
    # Its checkpoints are those after the resume, the same weights as the uninterrupted run's.
    expected_checkpoints = checkpoint_models(client, uninterrupted)
    assert sorted(expected_checkpoints) == EVAL_STEPS[1:-1]
    after_resume = checkpoint_models(client, resumed)
    assert sorted(after_resume) == [step for step in EVAL_STEPS[1:-1] if step > from_step]
    for step, model in after_resume.items():
        assert weights_of(model) == weights_of(expected_checkpoints[step]), step
    # train.keep: best output the weights of step 900, kept across the kill.
    assert resumed.data.tags[KEPT_STEP_TAG] == uninterrupted.data.tags[KEPT_STEP_TAG]
    assert uninterrupted.data.tags[KEPT_STEP_TAG] == str(BEST_STEP)
    assert resumed_model == weights_of(expected_checkpoints[BEST_STEP])
