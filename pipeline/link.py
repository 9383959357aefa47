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

It must stay cheap, since it runs on every no-op `dvc repro`: when run.json already names the
model's sha256 and the SQLite store holds no run RUNNING on this host, it imports neither MLflow
nor torch and reads the store read-only (about 0.1 s). Other stores go through MLflow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from pathlib import Path

from pipeline import runrecord
from pipeline.errors import stage_entry_point
from pipeline.files import file_sha256, process_is_alive
from pipeline.paths import MODEL_PATH

# The same defaults as pipeline.tracking, which imports MLflow (a second): see store_path().
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STORE_FILE = "mlflow.db"
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"


def store_path() -> Path | None:
    """The SQLite store tracking.tracking_uri() would use, or None for any other store."""
    configured = os.environ.get(TRACKING_URI_ENV)
    if configured:
        if not configured.startswith("sqlite:///"):
            return None
        return Path(configured.removeprefix("sqlite:///").split("?", 1)[0])
    return Path(os.environ.get("DVC_ROOT") or ".").resolve() / STORE_FILE


def abandoned_runs_in_sqlite(path: Path) -> bool | None:
    """Whether the store holds a run RUNNING on this host whose process has gone.

    Read-only, with the standard library: None when the store cannot be read this way.
    """
    if not path.is_file():
        return False
    query = """
        SELECT host.value, pid.value FROM runs
        JOIN tags AS host ON host.run_uuid = runs.run_uuid AND host.key = ?
        JOIN tags AS pid ON pid.run_uuid = runs.run_uuid AND pid.key = ?
        WHERE runs.status = 'RUNNING'
    """
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            rows = db.execute(query, (HOST_TAG, PID_TAG)).fetchall()
    except sqlite3.Error:
        return None
    host = socket.gethostname()
    return any(
        found_host == host and pid.isdigit() and not process_is_alive(int(pid))
        for found_host, pid in rows
    )


def main() -> None:
    if not MODEL_PATH.is_file():
        print(f"link: no {MODEL_PATH}, nothing to link")
        return
    model_sha256 = file_sha256(MODEL_PATH)
    linked = runrecord.recorded_model_sha256() == model_sha256
    store = store_path()
    abandoned = abandoned_runs_in_sqlite(store) if store is not None else None
    if linked and abandoned is False:
        runrecord.stage_for_experiment()
        return  # The common case, a no-op `dvc repro`: nothing to do, nothing imported.

    # Imported only now: MLflow costs a second or two to import and connect.
    from pipeline import tracking
    from pipeline.params import load_params

    params = load_params()
    experiment_id = tracking.connect(params.tracking.experiment_name)
    tracking.end_runs_of_dead_processes(experiment_id)
    if linked:
        runrecord.stage_for_experiment()
        return
    run_id = tracking.find_run(experiment_id, "train", tracking.MODEL_TAG, model_sha256)
    # A model pulled from a DVC remote may have been trained against another store.
    runrecord.write_run_record(run_id, model_sha256)
    if run_id is None:
        store_uri = tracking.shown_uri(tracking.tracking_uri())
        print(f"link: no training run in the MLflow store {store_uri} holds {MODEL_PATH}")
    else:
        print(f"link: {MODEL_PATH} was trained by MLflow run {run_id}")


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
