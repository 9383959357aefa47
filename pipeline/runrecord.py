"""data/train/run.json: the MLflow run that holds the workspace's model; and
data/train/registered.json: where that run and its registered version are.

Written by the train stage, and by the link stage after DVC restored a model from its run-cache.
It is a top-level metric of dvc.yaml, not a stage output, and git ignores it: the run id differs
from run to run and clone to clone, so it must enter neither dvc.lock nor a commit of `dvc repro`.
DVC stages top-level metrics into an experiment's commit, but not a file git ignores; under
`dvc exp run` (``DVC_EXP_NAME`` set) the file is therefore staged with ``git add --force``, so
that `dvc exp show` lists each experiment's run id. Standard library only: the link stage runs on
every `dvc repro` and must start fast.

registered.json holds what the link stage's summary needs besides the run id: the run's MLflow
experiment id (for its URL) and the registered model version the training made, with the aliases
it got then. Written beside run.json, by the same stages; ignored by git and no metric of DVC's,
so that its strings add no columns to `dvc exp show` and `dvc metrics show`. It names its run:
one that names another run than run.json is out of date (see recorded_registration).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable

from pipeline.files import write_json
from pipeline.paths import RUN_INFO_PATH

# Not in pipeline.paths, whose paths are those dvc.yaml declares: DVC does not know this file.
REGISTRATION_PATH = RUN_INFO_PATH.with_name("registered.json")


def write_run_record(run_id: str | None, model_sha256: str) -> None:
    write_json(RUN_INFO_PATH, {"mlflow_run_id": run_id, "model_sha256": model_sha256})
    stage_for_experiment()


def recorded_run() -> tuple[str | None, str | None]:
    """(MLflow run id, model sha256) that run.json names; (None, None) without a readable one."""
    try:
        record = json.loads(RUN_INFO_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(record, dict):
        return None, None
    run_id, model_sha256 = record.get("mlflow_run_id"), record.get("model_sha256")
    return (
        run_id if isinstance(run_id, str) else None,
        model_sha256 if isinstance(model_sha256, str) else None,
    )


def write_registration(
    run_id: str,
    experiment_id: str,
    model_name: str | None,
    version: str | None,
    aliases: Iterable[str],
) -> None:
    """Record the run's experiment and the version it registered (None: none found)."""
    record = {
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "registered_model": model_name,
        "version": version,
        "aliases": list(aliases),
    }
    write_json(REGISTRATION_PATH, record)


def recorded_registration(run_id: str) -> dict | None:
    """What registered.json says of this run; None without a readable one naming it."""
    try:
        record = json.loads(REGISTRATION_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("mlflow_run_id") != run_id:
        return None
    if not isinstance(record.get("experiment_id"), str):
        return None
    return record


def stage_for_experiment() -> None:
    """Under `dvc exp run`, stage run.json so that DVC commits it into the experiment."""
    if not os.environ.get("DVC_EXP_NAME") or not RUN_INFO_PATH.is_file():
        return
    subprocess.run(
        ["git", "add", "--force", "--", str(RUN_INFO_PATH)],
        capture_output=True,
        check=False,
    )
