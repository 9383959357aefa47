"""Stage 6, link: name the MLflow run that holds the workspace's model, end abandoned runs.

DVC runs this stage on every `dvc repro` and `dvc exp run` (``always_changed``), even when it
restores every other stage from its run-cache, when no other code of ours runs:

- ``data/train/run.json`` names the MLflow run that trained ``data/train/model.pt`` (the latest
  finished training run tagged with the model's sha256). The train stage writes it; after DVC
  restores a model from its run-cache, this stage rewrites it. It is a top-level metric in
  dvc.yaml, not a stage output: no hash of it enters dvc.lock, so dvc.lock stays byte-identical
  from run to run and clone to clone, while `dvc exp show` lists the run id of every experiment
  (see pipeline/runrecord.py for how it enters each experiment's commit).
- Runs left RUNNING by a stage killed with SIGKILL (or the out-of-memory killer) on this host
  are ended KILLED, as any stage does when it starts; here this also happens when no stage runs.
- A run.json whose run the store no longer holds (``mlflow.db`` deleted or replaced) is
  rewritten: the run that holds the model now, or none, and the stage says so.

It must stay cheap, since it runs on every no-op `dvc repro`: when run.json already names the
model's sha256, the SQLite store holds that run and no run RUNNING on this host, it imports
neither MLflow nor torch and reads the store read-only (about 0.1 s). Other stores go through
MLflow.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import runrecord, store
from pipeline.cli import stage_entry_point
from pipeline.files import file_sha256
from pipeline.paths import MODEL_PATH


def main() -> None:
    if not MODEL_PATH.is_file():
        print(f"link: no {MODEL_PATH}, nothing to link")
        return
    model_sha256 = file_sha256(MODEL_PATH)
    recorded_run_id, recorded_sha256 = runrecord.recorded_run()
    linked = recorded_sha256 == model_sha256
    sqlite_file = store.sqlite_store_path()
    abandoned = store.abandoned_runs_in_sqlite(sqlite_file) if sqlite_file else None
    if linked and abandoned is False and _still_in_sqlite(sqlite_file, recorded_run_id):
        runrecord.stage_for_experiment()
        return  # The common case, a no-op `dvc repro`: nothing to do, nothing imported.

    # Imported only now: MLflow costs a second or two to import and connect.
    from pipeline import tracking
    from pipeline.params import load_params

    params = load_params()
    experiment_id = store.connect(params.tracking.experiment_name)
    tracking.end_runs_of_dead_processes(experiment_id)
    store_uri = store.shown_uri(store.tracking_uri())
    if linked and (recorded_run_id is None or tracking.run_exists(recorded_run_id)):
        runrecord.stage_for_experiment()
        return
    if linked:
        # The store was replaced or wiped (mlflow.db deleted): the id would point nowhere.
        print(f"link: the MLflow store {store_uri} no longer holds run {recorded_run_id}")
    run_id = tracking.find_run(experiment_id, "train", tracking.MODEL_TAG, model_sha256)
    # A model pulled from a DVC remote may have been trained against another store.
    runrecord.write_run_record(run_id, model_sha256)
    if run_id is None:
        print(f"link: no training run in the MLflow store {store_uri} holds {MODEL_PATH}")
    else:
        print(f"link: {MODEL_PATH} was trained by MLflow run {run_id}")


def _still_in_sqlite(sqlite_file: Path | None, run_id: str | None) -> bool:
    """Whether the SQLite store still holds the run that run.json names (read-only, no MLflow).

    A run.json naming no run (the model was trained against another store) needs no look-up.
    """
    return run_id is None or (sqlite_file is not None and store.run_in_sqlite(sqlite_file, run_id))


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
