"""MLflow tracking shared by every stage: where the store is, and runs that always end.

With no configuration, runs go to the SQLite store ``mlflow.db`` at the repository root, the
file `mlflow ui` opens by default when started there. ``MLFLOW_TRACKING_URI`` points elsewhere
(a team's `mlflow server`, PostgreSQL). Under `dvc exp run --queue` or `--temp` a stage runs in a
temporary copy of the repo; DVC passes the original root in ``DVC_ROOT``, so queued experiments
land in the same store as the workspace's.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError, StageInterrupted
from pipeline.params import Params

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Queued experiments write to one SQLite file from several processes: wait for the lock
# instead of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60
SERVER_PROBE_TIMEOUT_S = 5


def repo_root() -> Path:
    """The repository the user works in, even when DVC runs us in a temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    configured = os.environ.get(TRACKING_URI_ENV)
    if configured:
        return configured
    return f"sqlite:///{repo_root() / STORE_FILE}?timeout={SQLITE_BUSY_TIMEOUT_S}"


def dvc_experiment_name() -> str | None:
    """The experiment's name when the stage runs under `dvc exp run`, else None."""
    return os.environ.get("DVC_EXP_NAME") or None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def use_store() -> str:
    """Point MLflow's tracking and registry at the store; return its URI.

    A tracking server that does not answer fails within seconds, naming the URI.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    return uri


def connect(experiment_name: str) -> str:
    """Point MLflow at the store, create the experiment if needed; return its id.

    Fails within seconds, naming the URI, when the store cannot be used.
    """
    uri = use_store()
    if uri.startswith("sqlite:"):
        return _prepare_sqlite_store(uri, experiment_name)
    return _get_or_create_experiment(experiment_name, artifact_location=None, uri=uri)


def sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _prepare_sqlite_store(uri: str, experiment_name: str) -> str:
    """Create or migrate the store and the experiment once, under a file lock.

    Several processes (`dvc queue start -j 4`) may open a new store at once: without the lock
    they race to create tables and the experiment, and fail ("table ... already exists"). WAL
    mode lets readers and one writer work side by side; it is a property of the file, so
    setting it once is enough.
    """
    from filelock import FileLock

    db_path = sqlite_path(uri)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db_path}.lock", timeout=SQLITE_BUSY_TIMEOUT_S):
        try:
            with contextlib.closing(sqlite3.connect(db_path, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as error:
            raise PipelineError(
                f"MLflow store {db_path} is not a usable SQLite database ({error}); "
                f"move it aside to start a new store, or set {TRACKING_URI_ENV}"
            ) from None
        artifact_location = (db_path.parent / ARTIFACTS_DIR).as_uri()
        # The first MLflow call of the process opens MLflow's store, which creates the tables
        # of a new store, or adds those an older MLflow lacked: that too must happen here.
        return _get_or_create_experiment(experiment_name, artifact_location, uri=str(db_path))


def _probe_server(uri: str) -> None:
    """Fail fast when a tracking server is down, instead of MLflow's minutes of retries."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # The server answered; MLflow's own calls will report a real problem.
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PipelineError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, "
            f"or unset {TRACKING_URI_ENV} to use the local store {STORE_FILE}"
        ) from None


def _get_or_create_experiment(name: str, artifact_location: str | None, uri: str) -> str:
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise PipelineError(
                    f"MLflow experiment '{name}' is deleted in {uri}: restore it with "
                    f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
                    "or set tracking.experiment_name"
                )
            return experiment.experiment_id
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        raise PipelineError(f"MLflow store {uri} cannot be used: {_first_line(error)}") from None
    except Exception as error:  # SQLAlchemy/driver errors: corrupt file, wrong schema, auth.
        if isinstance(error, PipelineError):
            raise
        raise PipelineError(
            f"MLflow store {uri} cannot be used ({type(error).__name__}: {_first_line(error)}); "
            f"if it was made by another MLflow version run `mlflow db upgrade`, "
            f"or set {TRACKING_URI_ENV}"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with run_id) an MLflow run that ends FINISHED, FAILED or KILLED.

    Ctrl-C and SIGTERM end it KILLED, any other error FAILED: no run is left RUNNING.
    """
    experiment_id = connect(params.tracking.experiment_name)
    all_tags = {"stage": stage, "mlflow.source.git.commit": git_commit(), **(tags or {})}
    if dvc_experiment_name():
        all_tags["dvc.exp_name"] = dvc_experiment_name()
    try:
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else run_name,
            parent_run_id=parent_run_id,
            # A resumed run keeps the tags it was created with (its stage is "train").
            tags=None if run_id else all_tags,
        )
    except MlflowException as error:
        raise PipelineError(f"cannot start the MLflow {stage} run: {_first_line(error)}") from None
    try:
        yield run
    except (KeyboardInterrupt, StageInterrupted):
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


@contextlib.contextmanager
def model_run(
    stage: str, params: Params, training_run_id: str, stage_params: dict[str, Any]
) -> Iterator[mlflow.ActiveRun]:
    """Log a downstream stage (evaluate, sample) into the run of the model it used.

    The training run already holds every param. If this stage's params were changed since
    (`dvc exp run -S sample.temperature=0.8` reruns only sampling), MLflow params being
    immutable, the stage logs into a child run of the training run instead.
    """
    connect(params.tracking.experiment_name)
    try:
        logged = mlflow.get_run(training_run_id).data.params
    except MlflowException:
        raise PipelineError(
            f"the training run {training_run_id} (data/train/run.json) is not in the MLflow "
            f"store {tracking_uri()}: rerun training with `dvc repro -f train`"
        ) from None
    changed = {k: v for k, v in stage_params.items() if k in logged and logged[k] != str(v)}
    if not changed:
        with stage_run(stage, params, run_id=training_run_id) as run:
            mlflow.log_params({k: v for k, v in stage_params.items() if k not in logged})
            yield run
        return
    name = dvc_experiment_name() or f"{stage}-" + "-".join(f"{k}={v}" for k, v in changed.items())
    with stage_run(stage, params, parent_run_id=training_run_id, run_name=name) as run:
        mlflow.log_params(stage_params)
        yield run
