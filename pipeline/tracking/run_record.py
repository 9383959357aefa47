"""data/train/run.json: the MLflow run that holds the workspace's model; and
data/train/registered.json: where that run and the registered version serving it are.

run.json is written by the train stage, registered.json by the register stage, and both by the
link stage after DVC restored a model from its run-cache or skipped those stages.

run.json is a top-level params file of dvc.yaml, not a stage output, and git ignores it: the run
id differs from run to run and clone to clone, so it must enter neither dvc.lock nor a commit of
`dvc repro`. A params file rather than a metric: `dvc exp show` lists its run id per experiment
as a column, while `dvc metrics show` and `dvc metrics diff`, which take only numbers, never see
it. DVC stages top-level files into an experiment's commit, but not a file git ignores; under
`dvc exp run` (``DVC_EXP_NAME`` set) the file is therefore staged with ``git add --force``, so
that `dvc exp show` lists each experiment's run id. Standard library only: the link stage runs on
every `dvc repro` and must start fast.

run.json holds the run id alone, since every key of it is a column of `dvc exp show` and a row
of `dvc exp diff`. The sha256 of the model that run trained, which the link stage compares with
data/train/model.pt, is in data/train/run_model.json beside it, with the run id it was recorded
for: a run.json that another commit brought back (`dvc exp apply`) names another run, so the
sha256 then counts as unknown and the link stage looks the run up again.

registered.json holds what the link stage's summary needs besides the run id: the run's MLflow
experiment id (for its URL) and the registered model version that serves the model, with the
aliases it got then. Written beside run.json; ignored by git and no file of DVC's,
so that its strings add no columns to `dvc exp show`. It names its run: one that names another
run than run.json is out of date (see recorded_registration).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline import git
from pipeline.files import write_json
from pipeline.paths import RUN_INFO_PATH

# Not in pipeline.paths, whose paths are those dvc.yaml declares: DVC does not know these files.
REGISTRATION_PATH = RUN_INFO_PATH.with_name("registered.json")
RUN_MODEL_PATH = RUN_INFO_PATH.with_name("run_model.json")


def write_run_record(run_id: str | None, model_sha256: str) -> None:
    write_json(RUN_MODEL_PATH, {"mlflow_run_id": run_id, "model_sha256": model_sha256})
    write_json(RUN_INFO_PATH, {"mlflow_run_id": run_id})
    stage_for_experiment()


def recorded_run() -> tuple[str | None, str | None]:
    """(MLflow run id that run.json names, sha256 of the model it trained); (None, None) without
    a readable run.json, a None sha256 without a run_model.json recorded for that run."""
    record = _read_record(RUN_INFO_PATH)
    if record is None:
        return None, None
    run_id = record.get("mlflow_run_id")
    if run_id is not None and not isinstance(run_id, str):
        return None, None
    model_record = _read_record(RUN_MODEL_PATH)
    if model_record is None or model_record.get("mlflow_run_id") != run_id:
        return run_id, None
    model_sha256 = model_record.get("model_sha256")
    return run_id, model_sha256 if isinstance(model_sha256, str) else None


def _read_record(path: Path) -> dict | None:
    """The JSON object in path; None without a readable one (missing, damaged, not an object)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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
    record = _read_record(REGISTRATION_PATH)
    if record is None or record.get("mlflow_run_id") != run_id:
        return None
    if not isinstance(record.get("experiment_id"), str):
        return None
    return record


def stage_for_experiment() -> None:
    """Under `dvc exp run`, stage run.json so that DVC commits it into the experiment."""
    if not os.environ.get("DVC_EXP_NAME") or not RUN_INFO_PATH.is_file():
        return
    git.stage_ignored_file(RUN_INFO_PATH)
