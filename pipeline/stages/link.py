"""Stage 7, link: name the MLflow run that holds the workspace's model, end abandoned runs,
and say where to look.

DVC runs this stage on every `dvc repro` and `dvc exp run` (``always_changed``), even when it
restores every other stage from its run-cache, when no other code of ours runs:

- ``data/train/run.json`` names the MLflow run that trained ``data/train/model.pt`` (the latest
  finished training run tagged with the model's sha256). The train stage writes it; after DVC
  restores a model from its run-cache, this stage rewrites it. It is a top-level params file of
  dvc.yaml, not a stage output: no hash of it enters dvc.lock, so dvc.lock stays byte-identical
  from run to run and clone to clone, while `dvc exp show` lists the run id of every
  experiment (see pipeline/tracking/run_record.py for how it enters each experiment's commit).
- Runs left RUNNING by a stage killed with SIGKILL (or the out-of-memory killer) on this host
  are ended KILLED, as any stage does when it starts; here this also happens when no stage runs.
- A run.json whose run the store no longer holds (``mlflow.db`` deleted or replaced) is
  rewritten: the run that holds the model now, or none, and the stage says so.
- A training run that lacks evaluate's metrics gets them from metrics.json: a training that
  gave the same weights as an earlier one reruns no stage after it (see _add_evaluation).
- Its last lines are the last a stage prints in `dvc repro` and `dvc exp run` (its deps make it
  run after evaluate, register and sample): the final losses beside the uniform baseline
  ln(V) and the bigram optimum, from metrics.json; the page of the MLflow run in the store in
  use (with the `mlflow ui` command that serves a local store); and the version the register
  stage made of the model, with the aliases it got. Printed whenever run.json names a run,
  also on a no-op `dvc repro`, which is where a user who comes back finds the latest result.
  The run's experiment id and the version come from data/train/registered.json
  (pipeline/tracking/run_record.py).

It must stay cheap, since it runs on every no-op `dvc repro`: when run_model.json gives
run.json's run the model's sha256, registered.json names that run, the SQLite store holds that
run and no run RUNNING on this host, it imports neither MLflow nor torch and reads the store
read-only (about 0.1 s). Other stores go through MLflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.files import file_sha256, read_json
from pipeline.paths import METRICS_PATH, MODEL_PATH, PROBS_PLOT_PATH, SAMPLING_DEFAULTS_PATH
from pipeline.secrets import masked
from pipeline.tracking import processes, run_record, store


def main() -> None:
    if not MODEL_PATH.is_file():
        print(f"link: no {MODEL_PATH}, nothing to link")
        return
    run_id = link_model()
    if run_id is not None:
        print("\n".join(summary_lines(run_id)))


def link_model() -> str | None:
    """Point run.json (and registered.json) at the run that trained the model; return its id."""
    model_sha256 = file_sha256(MODEL_PATH)
    recorded_run_id, recorded_sha256 = run_record.recorded_run()
    linked = recorded_sha256 == model_sha256
    sqlite_file = store.sqlite_store_path()
    abandoned = processes.abandoned_runs_in_sqlite(sqlite_file) if sqlite_file else None
    if (
        linked
        and abandoned is False
        and _still_in_sqlite(sqlite_file, recorded_run_id)
        and _registration_recorded(recorded_run_id)
    ):
        run_record.stage_for_experiment()
        return recorded_run_id  # The common case, a no-op `dvc repro`: nothing imported.

    # Imported only now: MLflow costs a second or two to import and connect.
    from pipeline.params import load_params
    from pipeline.tracking import lineage, runs

    params = load_params()
    experiment_id = store.connect(params.tracking.experiment_name)
    runs.end_runs_of_dead_processes(experiment_id)
    store_uri = masked(store.tracking_uri())
    if linked and (recorded_run_id is None or runs.run_exists(recorded_run_id)):
        if recorded_run_id is not None and not _registration_recorded(recorded_run_id):
            # A training whose weights came out the same as an earlier one's: DVC skipped
            # evaluate and register, whose deps did not change (or DVC restored them).
            _add_evaluation(recorded_run_id)
            _record_registration(recorded_run_id, model_sha256)
        run_record.stage_for_experiment()
        return recorded_run_id
    if linked:
        # The store was replaced or wiped (mlflow.db deleted): the id would point nowhere.
        print(f"link: the MLflow store {store_uri} no longer holds run {recorded_run_id}")
    run_id = runs.find_run(experiment_id, "train", lineage.MODEL_TAG, model_sha256)
    if run_id is not None:
        _add_evaluation(run_id)
        _record_registration(run_id, model_sha256)
    # A model pulled from a DVC remote may have been trained against another store.
    run_record.write_run_record(run_id, model_sha256)
    if run_id is None:
        print(f"link: no training run in the MLflow store {store_uri} holds {MODEL_PATH}")
    else:
        print(f"link: {MODEL_PATH} was trained by MLflow run {run_id}")
    return run_id


def _registration_recorded(run_id: str | None) -> bool:
    return run_id is None or run_record.recorded_registration(run_id) is not None


def _add_evaluation(run_id: str) -> None:
    """Give the training run evaluate's metrics and pictures when it lacks them.

    Evaluate adds them to the run that trained the model it scores. A later training that gives
    the same weights (a change to code that does not change the result) makes a new run, while
    DVC reruns no stage after it: without this, the run `dvc exp show` names would show only
    the losses training logged.
    """
    from mlflow import MlflowClient

    from pipeline.tracking import lineage, runs

    try:
        metrics = read_json(METRICS_PATH)
    except PipelineError:
        return  # No metrics.json yet: nothing to add.
    logged = MlflowClient().get_run(run_id).data.metrics
    if not isinstance(metrics, dict) or set(metrics) <= set(logged):
        return
    step = lineage.last_step(run_id, "val_loss")
    artifacts = tuple(path for path in (METRICS_PATH, PROBS_PLOT_PATH) if path.is_file())
    runs.add_to_run(run_id, metrics, step, artifacts)


def _record_registration(run_id: str, model_sha256: str) -> None:
    """Look up the run's experiment and the newest model version that serves the workspace's
    model (its weights and its sampling defaults), with the aliases that version holds now;
    record them in registered.json.

    The version may come from an earlier training that gave the same weights. For a model DVC
    restored from its run-cache, or whose register stage it skipped: the register stage
    records its own registration. MLflow is loaded here (the slow path).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import lineage

    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    served = f"tags.`{lineage.MODEL_TAG}` = '{model_sha256}'"
    if SAMPLING_DEFAULTS_PATH.is_file():
        defaults_sha256 = file_sha256(SAMPLING_DEFAULTS_PATH)
        served += f" and tags.`{lineage.SAMPLING_DEFAULTS_TAG}` = '{defaults_sha256}'"
    try:
        # Whatever the name: the registration used tracking's name then.
        found = list(client.search_model_versions(served))
    except MlflowException:
        found = []  # A store without a registry: the summary says no version holds it.
    newest = max(found, key=lambda version: version.creation_timestamp, default=None)
    if newest is not None:
        # A search leaves a version's aliases out; a look-up of the version has them.
        newest = client.get_model_version(newest.name, newest.version)
    run_record.write_registration(
        run_id,
        experiment_id,
        None if newest is None else newest.name,
        None if newest is None else str(newest.version),
        () if newest is None else newest.aliases,
    )


def summary_lines(run_id: str) -> list[str]:
    """Where to look: the result, the MLflow run's page, the registered version (see the
    module's docstring)."""
    lines = []
    result = _result_line()
    if result is not None:
        lines.append(result)
    registration = run_record.recorded_registration(run_id)
    if registration is None:
        return [*lines, f"MLflow run {run_id}"]
    url, command = store.run_page(registration["experiment_id"], run_id)
    lines.append(f"MLflow run: {url}")
    if command is not None:
        lines.append(f"  (to open it, start the UI in the repo root: {command})")
    name, version = registration.get("registered_model"), registration.get("version")
    if isinstance(version, str):
        aliases = "".join(f" @{alias}" for alias in sorted(registration.get("aliases") or ()))
        lines.append(f"registered model {name} version {version}{aliases}")
    else:
        lines.append("registered model: no version holds this run")
    return lines


def _result_line() -> str | None:
    """The final losses beside the baselines, from metrics.json; None without a readable one."""
    try:
        metrics = json.loads(METRICS_PATH.read_text(encoding="utf-8"))
        train, val = float(metrics["train_loss"]), float(metrics["val_loss"])
        uniform, optimum = float(metrics["uniform_loss"]), float(metrics["train_bigram_optimum"])
        vocab_size = round(math.exp(uniform))  # uniform_loss is ln(V)
    except (OSError, ValueError, TypeError, KeyError, OverflowError):
        return None
    return (
        f"result: val loss {val:.4f}, train loss {train:.4f}; uniform ln({vocab_size}) = "
        f"{uniform:.4f}, bigram optimum (train) {optimum:.4f}"
    )


def _still_in_sqlite(sqlite_file: Path | None, run_id: str | None) -> bool:
    """Whether the SQLite store still holds the run that run.json names (read-only, no MLflow).

    A run.json naming no run (the model was trained against another store) needs no look-up.
    """
    return run_id is None or (
        sqlite_file is not None and store.run_in_sqlite(sqlite_file, run_id) is True
    )


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
