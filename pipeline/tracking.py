"""MLflow tracking shared by every stage: where the store is, and runs that always end.

With no configuration, runs go to the SQLite store ``mlflow.db`` at the repository root, the
file `mlflow ui` opens by default when started there. ``MLFLOW_TRACKING_URI`` points elsewhere
(a team's `mlflow server`, PostgreSQL). Under `dvc exp run --queue` or `--temp` a stage runs in a
temporary copy of the repo; DVC passes the original root in ``DVC_ROOT``, so queued experiments
land in the same store as the workspace's.

A user and password in a server's URI (``http://user:password@host:5000``) are handed to MLflow
as ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, the way MLflow itself takes them, and
MLflow sees the URI without them: so it cannot print or store the password (its "View run at"
links, run and model URIs), and every message shows ``user:***``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import posixpath
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.errors import PipelineError, StageInterrupted
from pipeline.files import process_is_alive
from pipeline.params import Params
from pipeline.secrets import basic_auth_header, masked, split_credentials

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Queued experiments write to one SQLite file from several processes: wait for the lock
# instead of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60
SERVER_PROBE_TIMEOUT_S = 5
DATASET_LOG_ATTEMPTS = 3
# Which process runs a run, so that a later stage can end the runs of stages that were killed.
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
# How a later stage finds the run that made its input: by the input's sha256, tagged on the run.
# No run id enters a DVC-tracked file, so outputs stay byte-identical from run to run.
MODEL_TAG = "model_sha256"
MANIFEST_TAG = "manifest_sha256"
CORPUS_TAG = "corpus_sha256"


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


def run_name() -> str:
    """The training run's name: the DVC experiment's, or ``<branch>@<short commit>``."""
    if dvc_experiment_name():
        return dvc_experiment_name()
    branch = _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown"
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{branch}@{commit}"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


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
    if uri.startswith(("http://", "https://")):
        uri, user, password = split_credentials(uri)
        if user is not None:
            os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = user, password or ""
        _probe_server(uri)
    elif uri.startswith("sqlite:"):
        sqlite_path(uri)  # A URI without a file is refused before MLflow makes one of it.
    mlflow.set_tracking_uri(uri)
    return uri


def connect(experiment_name: str) -> str:
    """Point MLflow at the store, create the experiment if needed; return its id.

    Fails within seconds, naming the URI, when the store cannot be used.
    """
    uri = use_store()
    if uri.startswith("sqlite:"):
        return _prepare_sqlite_store(uri, experiment_name)
    return _get_or_create_experiment(experiment_name, artifact_location=None, uri=shown_uri(uri))


def shown_uri(uri: str) -> str:
    """The URI with its password masked, fit for an error message or a log."""
    return masked(uri)


def sqlite_path(uri: str) -> Path:
    """The file of a sqlite:/// URI: sqlite:///relative.db or sqlite:////absolute/path.db.

    SQLAlchemy reads ``sqlite://`` and ``sqlite:///:memory:`` as a store in memory, which would
    lose every run when the stage ends.
    """
    path = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        raise PipelineError(
            f"{TRACKING_URI_ENV}={shown_uri(uri)} names no database file: use "
            "sqlite:///relative/path/mlflow.db or sqlite:////absolute/path/mlflow.db, or unset it "
            f"to use {STORE_FILE} at the repository root"
        )
    return Path(path)


def _prepare_sqlite_store(uri: str, experiment_name: str) -> str:
    """Create or migrate the store and the experiment once, under a file lock.

    Several processes (`dvc queue start -j 4`) may open a new store at once: without the lock
    they race to create tables and the experiment, and fail ("table ... already exists"). WAL
    mode lets readers and one writer work side by side; it is a property of the file, so
    setting it once is enough.
    """
    from filelock import FileLock

    db_path = sqlite_path(uri)
    _check_store_is_writable(db_path)
    with FileLock(f"{db_path}.lock", timeout=SQLITE_BUSY_TIMEOUT_S):
        if db_path not in _checked_stores:
            check_sqlite_store(db_path)
            _checked_stores.add(db_path)
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
        # of a new store: that too must happen under the lock.
        return _get_or_create_experiment(experiment_name, artifact_location, uri=str(db_path))


# Stores this process has checked. The check reads the file with open(), and closing it drops
# every POSIX lock the process holds on the file, its SQLite connections' included: another
# process closing the store would then take itself for the last user and delete the WAL under
# this one ("disk I/O error" in parallel experiments). So each process checks a store once,
# before MLflow connects to it (evaluate and sample connect twice).
_checked_stores: set[Path] = set()


def _check_store_is_writable(db_path: Path) -> None:
    """Refuse a store this user cannot write, or cannot create, before SQLite or MLflow try.

    SQLite writes its journal and lock files beside the store, so the directory must be writable
    too. os.access answers for this user (root passes file modes, but not a read-only mount).
    """
    fix = f"fix that, or set {TRACKING_URI_ENV} to a store elsewhere"
    parent = db_path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        # The nearest existing directory on the way, or the file in the way.
        blocker = next((p for p in (parent, *parent.parents) if p.exists()), parent)
        reason = "is not a directory" if not blocker.is_dir() else f"({error.strerror})"
        raise PipelineError(
            f"MLflow store {db_path} cannot be created: {blocker} {reason}; {fix}"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(
            f"MLflow store directory {parent} is read-only or not writable by this user "
            f"(SQLite writes its journal beside {db_path.name}); {fix}"
        )
    if db_path.exists() and not os.access(db_path, os.R_OK | os.W_OK):
        raise PipelineError(
            f"MLflow store {db_path} is not readable and writable by this user; {fix} "
            f"(`chmod u+rw {db_path}` as its owner)"
        )


def check_sqlite_store(db_path: Path) -> None:
    """Refuse a store file that is truncated, has another MLflow version's schema, or keeps its
    artifacts in another repository's directory.

    Checked read-only before MLflow opens the file: MLflow would migrate an older store in place,
    and SQLite reads a truncated file without complaint until a query reaches a missing page.
    """
    if not db_path.exists() or db_path.stat().st_size == 0:
        return  # A new store: MLflow creates its tables.
    with open(db_path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        raise PipelineError(
            f"MLflow store {db_path} is not a SQLite database; move it aside to start a new "
            f"store, or set {TRACKING_URI_ENV}"
        )
    # The header's page count is valid when its two change counters agree. While a -wal file
    # holds commits not yet copied back, the main file may lag it: compare sizes only without.
    page_size = int.from_bytes(header[16:18], "big")
    expected_bytes = (65536 if page_size == 1 else page_size) * int.from_bytes(header[28:32], "big")
    actual_bytes = db_path.stat().st_size
    wal = Path(f"{db_path}-wal")
    has_wal = wal.exists() and wal.stat().st_size > 0
    if header[24:28] == header[92:96] and not has_wal and actual_bytes < expected_bytes:
        raise PipelineError(
            f"MLflow store {db_path} is truncated ({actual_bytes:,} bytes, its header says "
            f"{expected_bytes:,}); restore it from a backup, or move it aside to start a new store"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            found = db.execute("SELECT version_num FROM alembic_version").fetchone()
            locations = db.execute(
                "SELECT name, artifact_location FROM experiments WHERE lifecycle_stage = 'active'"
            ).fetchall()
    except sqlite3.OperationalError:
        return  # No alembic_version table: a store whose creation MLflow has yet to finish.
    except sqlite3.DatabaseError as error:
        raise PipelineError(
            f"MLflow store {db_path} is not a usable SQLite database ({error}); restore it from "
            f"a backup, or move it aside to start a new store, or set {TRACKING_URI_ENV}"
        ) from None
    # MLflow's own test for an up-to-date schema (SqlAlchemyStore runs it on every open).
    from mlflow.store.db.utils import _get_latest_schema_revision

    expected = _get_latest_schema_revision()
    if "experiments" in tables and found and found[0] != expected:
        raise PipelineError(
            f"MLflow store {db_path} has schema {found[0]} but MLflow {mlflow.__version__} "
            f"needs {expected}: if an older MLflow made it, back it up and run "
            f"`mlflow db upgrade sqlite:///{db_path}`; if a newer one did, use that version"
        )
    _check_artifact_locations(db_path, locations)


def _check_artifact_locations(db_path: Path, locations: list[tuple[str, str]]) -> None:
    """Refuse a store whose experiments keep artifacts in another copy of the repository.

    The store records absolute paths: after `mv repo repo2` every model would be looked up in the
    old place and new runs would recreate it there; a copy would write into the original's.
    """
    expected = (db_path.parent.resolve() / ARTIFACTS_DIR).as_uri()
    for name, location in locations:
        path = urllib.parse.urlsplit(location or "").path
        if (
            location.startswith("file:")
            and posixpath.basename(path.rstrip("/")) == ARTIFACTS_DIR
            and location.rstrip("/") != expected
        ):
            old_root = Path(urllib.parse.unquote(path)).parent
            how = "copied" if old_root.exists() else "moved"
            raise PipelineError(
                f"MLflow store {db_path} keeps the artifacts of experiment '{name}' in "
                f"{old_root / ARTIFACTS_DIR}, not beside it: the repository was {how} from "
                f"{old_root}; work there (move it back), or move {db_path.name} and "
                f"{ARTIFACTS_DIR}/ aside to start a new store here"
            )


def _probe_server(uri: str) -> None:
    """Fail fast when a tracking server is down, instead of MLflow's minutes of retries.

    uri has no user and password (use_store moved them to MLflow's variables): sent as basic
    auth, they let a server that guards /health answer too.
    """
    user = os.environ.get(USERNAME_ENV)
    headers = basic_auth_header(user, os.environ.get(PASSWORD_ENV, "")) if user else {}
    probe = urllib.request.Request(f"{uri.rstrip('/')}/health", headers=headers)
    try:
        with urllib.request.urlopen(probe, timeout=SERVER_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # The server answered; MLflow's own calls will report a real problem.
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise PipelineError(
            f"MLflow tracking server {shown_uri(uri)} is unreachable ({reason}); start it, "
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
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:
            # Parallel queue workers on a server all find no experiment; one creates it first.
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return mlflow.get_experiment_by_name(name).experiment_id
    except MlflowException as error:
        raise PipelineError(f"MLflow store {uri} cannot be used: {_first_line(error)}") from None
    except Exception as error:  # SQLAlchemy/driver errors: corrupt file, wrong schema, auth.
        if isinstance(error, PipelineError):
            raise
        raise PipelineError(
            f"MLflow store {uri} cannot be used ({type(error).__name__}: {_first_line(error)}); "
            f"check that it is reachable and {TRACKING_URI_ENV} is right"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_runs_of_dead_processes(experiment_id: str) -> None:
    """End KILLED the runs that stages on this machine left RUNNING when they died unhandled.

    SIGKILL, the out-of-memory killer or a power cut give a stage no chance to end its run;
    the next stage finds such runs by the host and process id tagged on them.
    """
    client = MlflowClient()
    host = socket.gethostname()
    left_running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
    )
    for run in left_running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not process_is_alive(int(pid)):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run that ends FINISHED, FAILED or KILLED.

    Ctrl-C, SIGTERM and SIGHUP end it KILLED, any other error FAILED: no run is left RUNNING.
    A stage only ever ends the run it started here.
    """
    experiment_id = connect(params.tracking.experiment_name)
    end_runs_of_dead_processes(experiment_id)
    all_tags = {"stage": stage, "mlflow.source.git.commit": git_commit(), **(tags or {})}
    if dvc_experiment_name():
        all_tags["dvc.exp_name"] = dvc_experiment_name()
    try:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            parent_run_id=parent_run_id,
            tags={**all_tags, **_process_tags()},
        )
    except MlflowException as error:
        raise PipelineError(f"cannot start the MLflow {stage} run: {_first_line(error)}") from None
    try:
        yield run
    except (KeyboardInterrupt, StageInterrupted):
        remove_unfinished_models(run.info.experiment_id, run.info.run_id)
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        remove_unfinished_models(run.info.experiment_id, run.info.run_id)
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def find_run(experiment_id: str, stage: str, tag: str, value: str) -> str | None:
    """The id of the latest FINISHED run of a stage tagged ``tag = value``, or None."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.stage = '{stage}' and tags.`{tag}` = '{value}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def training_run_id(params: Params, model_sha256: str) -> str:
    """The training run that made a model file: the latest FINISHED one tagged with its sha256."""
    experiment_id = connect(params.tracking.experiment_name)
    run_id = find_run(experiment_id, "train", MODEL_TAG, model_sha256)
    if run_id is None:
        raise PipelineError(
            f"no finished training run in the MLflow store {shown_uri(tracking_uri())} holds "
            f"data/train/model.pt (tag {MODEL_TAG} = {model_sha256[:12]}...): rerun training "
            "with `dvc repro -f train`"
        )
    return run_id


def remove_unfinished_models(experiment_id: str, run_id: str) -> None:
    """Delete what a failed run left of models it was logging, and mark them FAILED.

    A full disk or Ctrl-C while MLflow copies a model into the artifact store leaves a partial
    model directory there. Best effort: the stage is failing already, and its own error is the
    one to show.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient()
    try:
        models = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
    except Exception:
        return
    for model in models:
        if model.status == LoggedModelStatus.READY:
            continue
        with contextlib.suppress(Exception):
            get_artifact_repository(model.artifact_location).delete_artifacts()
            if model.artifact_location.startswith("file:"):
                # The model's own directory (models/<id>), now empty.
                local = Path(
                    urllib.parse.unquote(urllib.parse.urlsplit(model.artifact_location).path)
                )
                local.parent.rmdir()
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


@contextlib.contextmanager
def model_run(
    stage: str, params: Params, training_run: str, stage_params: dict[str, Any]
) -> Iterator[mlflow.ActiveRun]:
    """A downstream stage (evaluate, sample) logs into its own child run of the training run.

    The training run is never resumed, so its status stays the one training gave it; this
    stage's failure or interruption shows on the child run alone.
    """
    name = f"{stage} of {dvc_experiment_name() or run_name()}"
    with stage_run(stage, params, parent_run_id=training_run, run_name=name) as run:
        if stage_params:
            mlflow.log_params(stage_params)
        yield run


def add_to_run(
    run_id: str,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    artifacts: tuple[Path, ...] = (),
    texts: dict[str, str] | None = None,
) -> None:
    """Add metrics and artifacts to a finished run without resuming it: its status stays."""
    client = MlflowClient()
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], synchronous=True
        )
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    for artifact_file, text in (texts or {}).items():
        client.log_text(run_id, text, artifact_file)


def log_datasets(run_id: str, datasets_by_context: dict[str, Any]) -> None:
    """Link datasets to a run, each under its context ("training", "validation", ...).

    MLflow creates a dataset row on first use with a look-up then an insert, so two queue
    workers logging the same corpus at once can both miss it and one insert then fails on the
    store's unique key. All links go in one call (one transaction, rolled back on failure), so
    retrying finds the row the other worker committed and only adds the links.
    """
    inputs = [
        DatasetInput(
            dataset=dataset._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
        )
        for context, dataset in datasets_by_context.items()
    ]
    for attempt in range(DATASET_LOG_ATTEMPTS):
        try:
            MlflowClient().log_inputs(run_id, datasets=inputs)
            return
        except MlflowException:
            if attempt == DATASET_LOG_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def last_step(run_id: str, metric: str) -> int:
    """The last step at which a run logged a metric (0 if never)."""
    history = MlflowClient().get_metric_history(run_id, metric)
    return max((entry.step for entry in history), default=0)
