"""Stores that cannot serve, and runs that are not ours: each named within seconds, in one line.

The faults are real: HTTP and HTTPS servers on 127.0.0.1 whose /health answers while their API
fails or hangs, a server with a certificate of a private CA, a SQLite URI with a relative path,
a stage process killed with SIGKILL while it logs a model, and a live run of a process in
another pid namespace (a second container of the same host name). The PostgreSQL faults are in
tests/test_team_server.py, beside its PostgreSQL cluster.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.errors import PipelineError, disk_full_cause
from pipeline.tracking import processes, runs, store
from testbed import REPO_ROOT
from tests.support.faults import FILLER, full_file_system

# A hung server is named after the probe's time-out; the slack is for a loaded machine.
WITHIN_SECONDS = store.SERVER_PROBE_TIMEOUT_S + 5


@pytest.fixture(autouse=True)
def _restore_mlflow_uri() -> Iterator[None]:
    """store.use_store points this process's MLflow elsewhere; put it back afterwards."""
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


# Tracking servers that answer /health but cannot serve ------------------------------------


class HealthyButBroken(http.server.BaseHTTPRequestHandler):
    """/health is 200; every other path answers 503 or never answers (server.mode)."""

    def do_GET(self):
        if self.path == "/health":
            self._answer(200, b"OK")
        elif self.server.mode == "503":
            self._answer(503, b"backend store unavailable")
        else:
            self.server.stop.wait(60)  # Hangs, as a server whose database does not answer.

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class MlflowApi(HealthyButBroken):
    """A server whose API answers: an empty experiment search."""

    def do_GET(self):
        self._answer(200, json.dumps({"experiments": []}).encode())


@contextlib.contextmanager
def server(handler, mode: str = "", tls: ssl.SSLContext | None = None) -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.mode, httpd.stop = mode, threading.Event()
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("503", "cannot serve its API (HTTP 503"),
        ("hang", f"did not answer its API within {store.SERVER_PROBE_TIMEOUT_S} s"),
    ],
)
def test_a_server_whose_api_fails_while_health_answers_is_named_within_seconds(
    monkeypatch, mode, expected
):
    with server(HealthyButBroken, mode) as url:
        monkeypatch.setenv(store.TRACKING_URI_ENV, url)
        started = time.monotonic()
        # Before, the probe asked /health only, and MLflow then retried for minutes.
        with pytest.raises(PipelineError) as failure:
            store.use_store()
        elapsed = time.monotonic() - started

    assert elapsed < WITHIN_SECONDS
    message = str(failure.value)
    assert f"MLflow tracking server {url} {expected}" in message and "\n" not in message


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 that no system CA signed (its own CA), and a server's
    TLS context holding it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context


def test_a_tls_server_of_a_private_ca_is_probed_with_mlflows_own_tls_settings(
    monkeypatch, private_ca
):
    cert, context = private_ca
    with server(MlflowApi, tls=context) as url:
        monkeypatch.setenv(store.TRACKING_URI_ENV, url)
        with pytest.raises(PipelineError, match="CERTIFICATE_VERIFY_FAILED"):
            store.use_store()  # No setting: the private CA is unknown, as to MLflow.

        # Before, the probe refused the server although MLflow itself would connect.
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        assert store.use_store() == url
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        assert store.use_store() == url


# A SQLite store named by a relative path ----------------------------------------------------


def test_a_relative_sqlite_uri_is_a_store_of_the_repository_not_of_the_working_directory(
    monkeypatch, tmp_path
):
    """sqlite:///team.db, the form our own error recommends: under `dvc exp run --temp` the
    stage runs in a temporary copy (its working directory), and DVC_ROOT names the repo."""
    repo, workspace = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1234"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv(store.TRACKING_URI_ENV, "sqlite:///team.db")

    # Before: ValueError ("relative path can't be expressed as a file URI"), team.db left behind.
    experiment_id = store.connect("bigram")

    assert sorted(path.name for path in workspace.iterdir()) == []
    assert (repo / "team.db").is_file()
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (repo / "mlartifacts").as_uri()


def test_a_new_store_that_cannot_be_written_is_named_and_removed(monkeypatch, tmp_path):
    """A full disk while a new store is set up: the stages' full-disk line, and no empty
    team.db left for the next run to take as a store."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv(store.TRACKING_URI_ENV, "sqlite:///store/team.db")
    with full_file_system(tmp_path / "store", free_bytes=0) as directory:
        with pytest.raises(OSError) as failure:
            store.connect("bigram")
        left = sorted(path.name for path in directory.iterdir())

    # Before: "is not a usable SQLite database (database or disk is full)", team.db left.
    assert disk_full_cause(failure.value).filename == str(tmp_path / "store/team.db")
    assert left == [FILLER, "team.db.lock"]


def test_an_experiment_whose_artifacts_go_to_a_temporary_copy_of_dvc_is_refused(
    sqlite_store, tmp_path
):
    """Made by an earlier version under `dvc exp run --temp`: each artifact would be lost."""
    doomed = tmp_path / "repo/.dvc/tmp/exps/tmpab12/mlruns"
    MlflowClient().create_experiment("made-in-a-copy", artifact_location=doomed.as_uri())

    with pytest.raises(PipelineError) as failure:
        store.connect("made-in-a-copy")

    assert f"keeps its artifacts in {doomed}, inside a temporary copy" in str(failure.value)


# Whose run is it ----------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(monkeypatch, tmp_path) -> tuple[Path, str]:
    """A new SQLite store with the experiment `bigram`, this process's MLflow pointed at it."""
    path = tmp_path / "mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv(store.TRACKING_URI_ENV, f"sqlite:///{path}")
    return path, store.connect("bigram")


# Runs in a child process: starts a run tagged as a stage's, then does what argv[3] says.
STAGE_LIKE_RUN = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import mlflow
    from pipeline.tracking import processes

    uri, experiment_id, then = sys.argv[1:4]
    mlflow.set_tracking_uri(uri)
    run = mlflow.start_run(experiment_id=experiment_id, tags=processes.process_tags())
    if then == "sigkill-while-logging-a-model":
        mlflow.initialize_logged_model(name="model", source_run_id=run.info.run_id)
        os.kill(os.getpid(), signal.SIGKILL)
    ready, stop = Path(sys.argv[4]), Path(sys.argv[5])
    ready.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    """
)


def stage_like_run(*args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, sys.executable, "-c", STAGE_LIKE_RUN, *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def test_a_stage_killed_while_logging_a_model_leaves_no_model_pending(sqlite_store):
    path, experiment_id = sqlite_store
    killed = subprocess.run(
        stage_like_run(f"sqlite:///{path}", experiment_id, "sigkill-while-logging-a-model"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    client = MlflowClient()
    [model] = client.search_logged_models([experiment_id])
    assert model.status.name == "PENDING"
    assert processes.abandoned_runs_in_sqlite(path) is True  # What the link stage reads.

    runs.end_runs_of_dead_processes(experiment_id)

    [run] = client.search_runs([experiment_id])
    assert run.info.status == "KILLED"
    # Before, the model stayed PENDING for ever.
    assert client.get_logged_model(model.model_id).status.name == "FAILED"


def first_pid_free_here(start: int = 300) -> int:
    """A process id no process of this pid namespace has now."""
    return next(pid for pid in range(start, 32768) if not Path(f"/proc/{pid}").exists())


# Runs as pid 1 of a new pid namespace: forks until a child gets argv[1] as its pid there, and
# lets that child run the rest of the command line.
FORK_UNTIL_PID = textwrap.dedent(
    """
    import os, sys
    target = int(sys.argv[1])
    while True:
        child = os.fork()
        if child == 0:
            if os.getpid() == target:
                os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
            os._exit(0)
        os.waitpid(child, 0)
        if child == target:
            break
    """
)


def test_a_live_run_of_another_pid_namespace_is_left_running(sqlite_store, tmp_path):
    """A second container with the same host name on the same store: its stage's pid means
    nothing here, and this pid namespace has no process of that id."""
    path, experiment_id = sqlite_store
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    pid_there = first_pid_free_here()
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    in_container = ["unshare", "--pid", "--fork", "--mount-proc"]
    command = [
        *in_container,
        sys.executable,
        "-c",
        FORK_UNTIL_PID,
        str(pid_there),
        *stage_like_run(f"sqlite:///{path}", experiment_id, "wait", str(ready), str(stop))[1:],
    ]
    probe = subprocess.run([*in_container, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    container = subprocess.Popen(command, env=child_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert container.poll() is None, container.stderr.read()
            assert time.monotonic() < deadline, "the run in the other namespace never started"
            time.sleep(0.1)
        assert ready.read_text() == str(pid_there)
        assert not Path(f"/proc/{pid_there}").exists()

        # Before, host name and pid matched a process that has gone here: the run was KILLED.
        assert processes.abandoned_runs_in_sqlite(path) is False
        runs.end_runs_of_dead_processes(experiment_id)
        [run] = MlflowClient().search_runs([experiment_id])
        assert run.info.status == "RUNNING"
    finally:
        stop.touch()
        try:
            container.wait(timeout=30)
        except subprocess.TimeoutExpired:
            container.kill()
            container.wait()
