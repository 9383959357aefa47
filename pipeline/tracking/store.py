"""Where the MLflow store is, and opening it safely: the plumbing under the other tracking modules.

With no configuration, runs go to the SQLite store ``mlflow.db`` at the repository root, the
file `mlflow ui` opens by default when started there. ``MLFLOW_TRACKING_URI`` points elsewhere
(a team's `mlflow server`, PostgreSQL). Under `dvc exp run --queue` or `--temp` a stage runs in a
temporary copy of the repo; DVC passes the original root in ``DVC_ROOT``, so queued experiments
land in the same store as the workspace's.

A user and password in a server's URI (``http://user:password@host:5000``) are handed to MLflow
as ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, the way MLflow itself takes them, and
MLflow sees the URI without them: so it cannot print or store the password (its "View run at"
links, run and model URIs), and every message shows ``user:***``.

A relative SQLite path (``sqlite:///team.db``) is a file of the repository the user works in, not
of the temporary copy a `dvc exp run --temp` runs in. Every store the stages use is probed before
MLflow's minutes of retries: a tracking server must answer a real API call, a database one
connection, each within seconds. A new experiment in a database store keeps its artifacts in the
repository's ``mlartifacts``, never in DVC's temporary copy, which DVC deletes.

Before MLflow opens a SQLite store, the store is checked (a truncated file, another MLflow
version's schema, a repository that was moved) and created under a file lock, so that parallel
queue workers do not race. MLflow is imported inside the functions that call it: the link stage
reads this module on every `dvc repro` and must not pay a second for MLflow.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import posixpath
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.secrets import basic_auth_header, masked, open_url, split_credentials

if TYPE_CHECKING:
    import ssl


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Queued experiments write to one SQLite file from several processes: wait for the lock
# instead of failing with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60
# Long enough for a busy server's first API answer (the basic-auth app checks a password hash on
# a loaded 2-core machine in seconds), short beside MLflow's own minutes of retries.
SERVER_PROBE_TIMEOUT_S = 20
# A real API call: a server's /health may answer while its backend store cannot serve.
SERVER_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
DATABASE_CONNECT_TIMEOUT_S = 5
# Database stores MLflow opens through SQLAlchemy; the first two take libpq's and PyMySQL's
# `connect_timeout`.
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
TIMEOUT_SCHEMES = ("postgresql", "mysql")


def repo_root() -> Path:
    """The repository the user works in, even when DVC runs us in a temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    configured = os.environ.get(TRACKING_URI_ENV)
    if configured:
        return configured
    return f"sqlite:///{repo_root() / STORE_FILE}?timeout={SQLITE_BUSY_TIMEOUT_S}"


def use_store() -> str:
    """Point MLflow's tracking and registry at the store; return its URI.

    A tracking server that does not answer fails within seconds, naming the URI.
    """
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        uri, user, password = split_credentials(uri)
        if user is not None:
            os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = user, password or ""
        _probe_server(uri)
    elif uri.startswith("sqlite:"):
        uri = absolute_sqlite_uri(uri)
    elif database_scheme(uri) is not None:
        _probe_database(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def absolute_sqlite_uri(uri: str) -> str:
    """The URI naming its file by an absolute path (see sqlite_path), its query kept.

    MLflow would read sqlite:///team.db against the working directory: under `dvc exp run
    --temp`, a temporary copy that DVC deletes with every run in it.
    """
    query = uri.partition("?")[2]
    return f"sqlite:///{sqlite_path(uri)}" + (f"?{query}" if query else "")


def database_scheme(uri: str) -> str | None:
    """postgresql, mysql or mssql for a database URI (``postgresql+psycopg://...`` too)."""
    scheme = uri.partition(":")[0].partition("+")[0].lower()
    return scheme if scheme in DATABASE_SCHEMES else None


def connect(experiment_name: str) -> str:
    """Point MLflow at the store, create the experiment if needed; return its id.

    Fails within seconds, naming the URI, when the store cannot be used.
    """
    uri = use_store()
    if uri.startswith("sqlite:"):
        return _prepare_sqlite_store(uri, experiment_name)
    # A server chooses its own artifact root. A database store would give a new experiment
    # ./mlruns of the working directory: DVC's temporary copy under `dvc exp run --temp` or a
    # queue worker, deleted with every artifact of the experiment's runs, later ones included.
    artifact_location = None if uri.startswith(("http:", "https:")) else repo_artifacts_uri()
    return _get_or_create_experiment(experiment_name, artifact_location, uri=masked(uri))


def repo_artifacts_uri() -> str:
    """mlartifacts/ of the repository the user works in (DVC_ROOT under a temporary copy)."""
    return (repo_root() / ARTIFACTS_DIR).as_uri()


# Where `mlflow ui` serves by default.
LOCAL_UI_URL = "http://127.0.0.1:5000"
# The query that makes MLflow's UI lay a page out for model training. MLflow 3.17's UI picks the
# layout (its "GenAI / Model training" switch) from this query, else from what the browser last
# chose (localStorage `mlflow.workflowType_v1`), else GenAI: never from the experiment's kind tag.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def run_page(experiment_id: str, run_id: str) -> tuple[str, str | None]:
    """Where a user opens a run: its page in MLflow's UI, and for a store that no server serves
    (SQLite, a database) the `mlflow ui` command that serves it.

    The page opens in the model-training layout (MODEL_TRAINING_VIEW). A server's user and
    password are left out of its URL (the browser asks for them), secret query fields masked:
    the URL is printed.
    """
    page = f"#/experiments/{experiment_id}/runs/{run_id}{MODEL_TRAINING_VIEW}"
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        server = split_credentials(uri)[0].partition("?")[0].partition("#")[0]
        return masked(f"{server.rstrip('/')}/{page}"), None
    if uri.startswith("sqlite:///"):
        store_uri = f"sqlite:///{_shown_sqlite_path(sqlite_path(uri))}"
    else:
        store_uri = masked(uri)
    return f"{LOCAL_UI_URL}/{page}", f"mlflow ui --backend-store-uri {store_uri}"


def _shown_sqlite_path(path: Path) -> str:
    """The store file relative to the repository root, where `mlflow ui` is started; else
    absolute (sqlite:/// then has four slashes)."""
    try:
        return str(path.relative_to(repo_root()))
    except ValueError:
        return str(path)


def sqlite_path(uri: str) -> Path:
    """The file of a sqlite:/// URI, absolute: sqlite:////absolute/path.db, or
    sqlite:///relative.db, relative to the repository root (repo_root).

    SQLAlchemy reads ``sqlite://`` and ``sqlite:///:memory:`` as a store in memory, which would
    lose every run when the stage ends.
    """
    path = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        raise PipelineError(
            f"{TRACKING_URI_ENV}={masked(uri)} names no database file: use "
            "sqlite:///relative/path/mlflow.db or sqlite:////absolute/path/mlflow.db, or unset it "
            f"to use {STORE_FILE} at the repository root"
        )
    return repo_root() / path


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
    with FileLock(f"{db_path}.lock", timeout=SQLITE_BUSY_TIMEOUT_S), _removed_if_left_new(db_path):
        if db_path not in _checked_stores:
            check_sqlite_store(db_path)
            _checked_stores.add(db_path)
        try:
            with contextlib.closing(sqlite3.connect(db_path, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as error:
            if error.sqlite_errorcode == sqlite3.SQLITE_FULL:
                # A full disk is not a damaged store: the stages name the file and the fix.
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(db_path)) from None
            raise PipelineError(
                f"MLflow store {db_path} is not a usable SQLite database ({error}); "
                f"move it aside to start a new store, or set {TRACKING_URI_ENV}"
            ) from None
        artifact_location = (db_path.parent / ARTIFACTS_DIR).as_uri()
        # The first MLflow call of the process opens MLflow's store, which creates the tables
        # of a new store: that too must happen under the lock.
        return _get_or_create_experiment(experiment_name, artifact_location, uri=str(db_path))


@contextlib.contextmanager
def _removed_if_left_new(db_path: Path):
    """A store this process creates, but fails to set up, is deleted: no empty team.db stays.

    Held under the store's file lock, so no other process can have started using it meanwhile.
    """
    existed = db_path.exists()
    try:
        yield
    except BaseException:
        if not existed:
            for leftover in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
                leftover.unlink(missing_ok=True)
        raise


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
    import mlflow
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
    """Fail fast when a tracking server cannot serve, instead of MLflow's minutes of retries.

    One API call, as MLflow would make it, bounded by SERVER_PROBE_TIMEOUT_S: a server that is
    down, hangs, or answers 5xx (its /health may still answer) is named. Other answers (401, 404)
    are left to MLflow's own calls, which report them in one line. uri has no user and password
    (use_store moved them to MLflow's variables): sent as basic auth, to this origin only
    (secrets.open_url).
    """
    user = os.environ.get(USERNAME_ENV)
    headers = basic_auth_header(user, os.environ.get(PASSWORD_ENV, "")) if user else {}
    probe = urllib.request.Request(f"{uri.rstrip('/')}{SERVER_PROBE_PATH}", headers=headers)
    fix = f"start it, or unset {TRACKING_URI_ENV} to use the local store {STORE_FILE}"
    try:
        with open_url(probe, SERVER_PROBE_TIMEOUT_S, tracking_tls_context()) as response:
            response.read(1)
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise PipelineError(
                f"MLflow tracking server {masked(uri)} cannot serve its API (HTTP "
                f"{error.code} {error.reason} from {SERVER_PROBE_PATH.partition('?')[0]}): see "
                f"the server's log, its backend store may be down; or unset {TRACKING_URI_ENV} "
                f"to use the local store {STORE_FILE}"
            ) from None
    except TimeoutError:
        raise PipelineError(
            f"MLflow tracking server {masked(uri)} did not answer its API within "
            f"{SERVER_PROBE_TIMEOUT_S} s: see the server's log; or unset {TRACKING_URI_ENV} to "
            f"use the local store {STORE_FILE}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise PipelineError(
            f"MLflow tracking server {masked(uri)} is unreachable ({reason}); {fix}"
        ) from None


def tracking_tls_context() -> ssl.SSLContext:
    """The TLS settings MLflow itself uses for a tracking server: a private CA
    (MLFLOW_TRACKING_SERVER_CERT_PATH, else requests' REQUESTS_CA_BUNDLE), a client certificate
    (MLFLOW_TRACKING_CLIENT_CERT_PATH), or no verification (MLFLOW_TRACKING_INSECURE_TLS)."""
    import ssl

    from mlflow.environment_variables import (
        MLFLOW_TRACKING_CLIENT_CERT_PATH,
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
    )

    try:
        insecure = MLFLOW_TRACKING_INSECURE_TLS.get()
    except ValueError:
        raise PipelineError(
            f"{MLFLOW_TRACKING_INSECURE_TLS.name} must be true or false, got "
            f"{os.environ.get(MLFLOW_TRACKING_INSECURE_TLS.name)!r}"
        ) from None
    if insecure:
        return ssl._create_unverified_context()
    variable, ca = MLFLOW_TRACKING_SERVER_CERT_PATH.name, MLFLOW_TRACKING_SERVER_CERT_PATH.get()
    for fallback in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if not ca and os.environ.get(fallback):
            variable, ca = fallback, os.environ[fallback]
    client_cert = MLFLOW_TRACKING_CLIENT_CERT_PATH.get()
    try:
        context = ssl.create_default_context(
            cafile=ca if ca and not os.path.isdir(ca) else None,
            capath=ca if ca and os.path.isdir(ca) else None,
        )
        if client_cert:
            variable = MLFLOW_TRACKING_CLIENT_CERT_PATH.name
            context.load_cert_chain(client_cert)
    except (OSError, ssl.SSLError) as error:
        raise PipelineError(
            f"{variable}={ca if variable != MLFLOW_TRACKING_CLIENT_CERT_PATH.name else client_cert}"
            f" cannot be used ({getattr(error, 'strerror', None) or error}): point it at a PEM "
            "file"
        ) from None
    return context


def _probe_database(uri: str) -> None:
    """One connection to a database store, bounded by DATABASE_CONNECT_TIMEOUT_S.

    MLflow retries a failing connection for a minute and a half, logging each try in several
    lines; a wrong password or a closed port is then named within seconds, in one line. Its
    retry warnings are silenced: this probe has said what they would.
    """
    import logging

    import sqlalchemy
    from sqlalchemy.pool import NullPool

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.ERROR)
    timeout = {"connect_timeout": DATABASE_CONNECT_TIMEOUT_S}
    engine = None
    try:
        engine = sqlalchemy.create_engine(
            uri,
            poolclass=NullPool,
            connect_args=timeout if database_scheme(uri) in TIMEOUT_SCHEMES else {},
        )
        with engine.connect():
            pass
    except ModuleNotFoundError as error:
        raise PipelineError(
            f"MLflow store {masked(uri)} needs the Python module '{error.name}', its "
            "database driver, which is not installed: install it, or name an installed driver "
            f"in {TRACKING_URI_ENV} (postgresql+psycopg://...)"
        ) from None
    except Exception as error:  # The driver's errors, a malformed URI.
        cause = getattr(error, "orig", None) or error
        raise PipelineError(
            f"MLflow store {masked(uri)} cannot be reached ({type(cause).__name__}: "
            f"{first_line(cause)}); check that the database runs and that the host, port, user "
            f"and password in {TRACKING_URI_ENV} are right"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()


# MLflow's experiment-kind tag and the value of a model-training experiment (the others are
# genai_development and, inferred by the UI, *_inferred kinds): what the experiment is, for the
# API and for UIs that read it. MLflow 3.17's own UI does not: its layout follows the page's
# query or the browser (MODEL_TRAINING_VIEW), whatever the tag says.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
MODEL_TRAINING_TAGS = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}


def _mark_as_model_training(experiment) -> None:
    """Give an experiment made before this tag existed, or by hand, the model-training kind.

    A write only when the tag is missing or different: every stage connects, and the experiment
    the store returned already carries its tags.
    """
    import mlflow

    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
        )


def _get_or_create_experiment(name: str, artifact_location: str | None, uri: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise PipelineError(
                    f"MLflow experiment '{name}' is deleted in {uri}: restore it with "
                    f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
                    "or set tracking.experiment_name"
                )
            _check_not_in_a_temporary_copy(experiment)
            _mark_as_model_training(experiment)
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(
                name, artifact_location=artifact_location, tags=MODEL_TRAINING_TAGS
            )
        except MlflowException as error:
            # Parallel queue workers on a server all find no experiment; one creates it first.
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:  # Created by the other worker, then deleted at once.
                raise
            _mark_as_model_training(experiment)
            return experiment.experiment_id
    except MlflowException as error:
        raise PipelineError(f"MLflow store {uri} cannot be used: {first_line(error)}") from None
    except Exception as error:  # SQLAlchemy/driver errors: corrupt file, wrong schema, auth.
        if isinstance(error, PipelineError):
            raise
        raise PipelineError(
            f"MLflow store {uri} cannot be used ({type(error).__name__}: {first_line(error)}); "
            f"check that it is reachable and {TRACKING_URI_ENV} is right"
        ) from None


# Where DVC makes the temporary copies of `dvc exp run --temp` and queue workers.
DVC_TEMPORARY_COPIES = "/.dvc/tmp/exps/"


def _check_not_in_a_temporary_copy(experiment) -> None:
    """Refuse an experiment whose artifacts go to a temporary copy of DVC, which DVC deletes.

    Earlier versions let MLflow give a new experiment of a database store ./mlruns of the
    working directory: made under `dvc exp run --temp`, every model logged there is lost.
    """
    location = experiment.artifact_location or ""
    path = urllib.parse.unquote(urllib.parse.urlsplit(location).path)
    if location.startswith(("file:", "/")) and DVC_TEMPORARY_COPIES in path:
        raise PipelineError(
            f"MLflow experiment '{experiment.name}' keeps its artifacts in {path}, inside a "
            "temporary copy that DVC deletes after each `dvc exp run --temp` or queued run: "
            "set tracking.experiment_name to a new experiment (the stages create it with "
            f"{ARTIFACTS_DIR}/ of the repository), or create one with a lasting artifact "
            "location (`mlflow experiments create -n NAME -l DIR`)"
        )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def sqlite_store_path() -> Path | None:
    """The file of the store tracking_uri() names when it is SQLite, else None."""
    uri = tracking_uri()
    return sqlite_path(uri) if uri.startswith("sqlite:///") else None


def read_sqlite(path: Path, query: str, parameters: tuple) -> list[tuple] | None:
    """Rows of a read-only query, with the standard library (no MLflow); None when the store
    cannot be read so."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            return db.execute(query, parameters).fetchall()
    except sqlite3.Error:
        return None


def run_in_sqlite(path: Path, run_id: str) -> bool | None:
    """Whether a SQLite store holds the run (not deleted); None when it cannot be read."""
    if not path.is_file():
        return False
    query = "SELECT 1 FROM runs WHERE run_uuid = ? AND lifecycle_stage = 'active'"
    rows = read_sqlite(path, query, (run_id,))
    return None if rows is None else bool(rows)
