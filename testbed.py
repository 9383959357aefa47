"""Throwaway copies of this repository to run the pipeline in, and the small tools tests and
benchmarks use on them.

Tests (through tests/conftest.py's fixtures and directly) and benchmarks (benchmarks/stages.py,
benchmarks/turnaround.py) share these helpers; neither imports the other. The module sits at the
repository root, so that `python -m pytest` and `python -m benchmarks.run`, both run from there,
import it as ``testbed``. It is not part of the installed package (pyproject.toml packages only
``pipeline``).

Nothing here reads the workspace's params.yaml, dvc.lock, data/ or mlflow.db, which the README's
commands change: copies get params.yaml as committed at HEAD.

- Paths and constants: REPO_ROOT, VENV_BIN, CORPUS_SHA256, FAST_TRAIN, NOT_COPIED,
  ARTIFACT_COLUMNS.
- Repo copies: write_committed_params, make_repo_copy, make_fast_repo_copy, copy_trained_repo,
  update_params, commit_all.
- Processes: pipeline_env, run, run_stage; serve_directory, free_port.
- What a run left behind: assert_one_line_error, files_in, mlflow_runs, run_statuses.
- Servers on 127.0.0.1: background (any server process, until it answers), mlflow_server,
  s3_server (moto's S3-compatible server, S3Server).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from pipeline.params import CORPUS_URL_ENV

REPO_ROOT = Path(__file__).resolve().parent
# Tiny Shakespeare's sha256, as params.yaml's data.sha256 has it.
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The bin directory of the running interpreter's venv: dvc, mlflow and python for subprocesses.
VENV_BIN = Path(sys.executable).parent
# Few iterations keep the end-to-end runs short; the real defaults are checked elsewhere.
FAST_TRAIN = {"max_iters": 300, "eval_interval": 100, "lr": 0.02}
# Left out of copies of a trained repo: each copy gets its own MLflow store and DVC state.
NOT_COPIED = {"mlflow.db", "mlflow.db-wal", "mlflow.db-shm", "mlflow.db.lock", "mlartifacts", "tmp"}
# The columns of MLflow's SQL store that hold an absolute artifact path (besides experiments').
ARTIFACT_COLUMNS = (
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


# Repo copies --------------------------------------------------------------------------------


def write_committed_params(directory: Path) -> Path:
    """Write params.yaml as committed at HEAD into directory; return its path.

    Not the workspace's: `dvc exp run -S train.lr=3e-3` and `dvc exp apply` rewrite that one.
    """
    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = directory / "params.yaml"
    path.write_text(committed)
    return path


def update_params(repo: Path, **sections: dict) -> None:
    """Overwrite some params in repo/params.yaml, e.g. train={"max_iters": 300}."""
    yaml = YAML()
    path = repo / "params.yaml"
    params = yaml.load(path)
    for section, values in sections.items():
        params[section].update(values)
    yaml.dump(params, path)


def make_repo_copy(destination: Path, env: dict[str, str]) -> Path:
    """A fresh git repo holding the working tree's files (tracked and new, not ignored).

    Copying the working tree rather than cloning HEAD tests uncommitted changes too; CI runs on
    a fresh clone of main anyway. params.yaml is the committed one: experiments rewrite the
    workspace's.
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    write_committed_params(destination)
    # The lock file describes the developer's last run, not this copy's.
    (destination / "dvc.lock").unlink(missing_ok=True)
    run(["git", "init", "-q", "-b", "main"], destination, env)
    commit_all(destination, env, "copy of the working tree")
    return destination


def commit_all(repo: Path, env: dict[str, str], message: str) -> None:
    """Commit everything git does not ignore in repo (an empty commit if nothing changed)."""
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "--allow-empty", "-m", message], repo, env)


def make_fast_repo_copy(destination: Path, corpus_url: str) -> tuple[Path, dict[str, str]]:
    """A repo copy with FAST_TRAIN and a short sample, committed; and its pipeline_env."""
    env = pipeline_env(corpus_url)
    repo = make_repo_copy(destination, env)
    update_params(repo, train=FAST_TRAIN, sample={"num_chars": 200})
    commit_all(repo, env, "fast params for tests")
    return repo, env


def copy_trained_repo(trained: Path, destination: Path) -> Path:
    """The trained repo with its git history, DVC cache and outputs, but a new MLflow store."""
    shutil.copytree(trained, destination, ignore=lambda _dir, names: NOT_COPIED & set(names))
    return destination


def copy_repo_with_store(source: Path, destination: Path) -> Path:
    """A repo copy with its MLflow store, whose runs then go on in the copy.

    The store records artifact directories as absolute paths: the experiment's, every run's,
    every logged model's and version's are pointed at the copy's own, so that artifacts logged
    in the copy do not land in the source and those read come from the copy.
    """
    shutil.copytree(source, destination, symlinks=True)
    old, new = f"{source.resolve()}/", f"{destination.resolve()}/"
    with contextlib.closing(sqlite3.connect(destination / "mlflow.db")) as db, db:
        db.execute(
            "UPDATE experiments SET artifact_location = ?",
            ((destination / "mlartifacts").as_uri(),),
        )
        for table, column in ARTIFACT_COLUMNS:
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (old, new))
    return destination


# Processes ----------------------------------------------------------------------------------


def pipeline_env(corpus_url: str | None, **extra: str) -> dict[str, str]:
    """Environment for `dvc` and stage subprocesses: this venv first, local corpus, no server.

    corpus_url goes into $BIGRAM_CORPUS_URL; None leaves it unset, so stages fetch data.url.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_")) and k != CORPUS_URL_ENV
    }
    if corpus_url is not None:
        env[CORPUS_URL_ENV] = corpus_url
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: int = 600):
    """Run a command, capturing its output as text; check: raise AssertionError, with the ends
    of its stdout and stderr, when it exits non-zero."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def run_stage(stage: str, repo: Path, env: dict[str, str], timeout: int = 120):
    """Run one stage as DVC would (`python -m pipeline.stages.<stage>` in the repo), unchecked."""
    command = [sys.executable, "-m", f"pipeline.stages.{stage}"]
    return run(command, repo, env, check=False, timeout=timeout)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging each request to stderr."""

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve a directory over HTTP on 127.0.0.1 (a free port); yield the base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A port nobody listens on right now (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# What a run left behind ---------------------------------------------------------------------


def assert_one_line_error(result, *mentions: str) -> str:
    """A failed stage: non-zero exit, stderr exactly one `error: ...` line naming every mention."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])
    return lines[0]


# The link stage's command line as DVC prints it, and what DVC itself prints after the last
# stage (DVC 3): the lock file, then what it ran.
LINK_COMMAND = "> python -m pipeline.stages.link"
DVC_TRAILING = (
    "Updating lock file",
    "Use `dvc push`",
    "Ran experiment(s)",
    "Experiment results have been applied",
)


def last_stage_lines(stdout: str) -> list[str]:
    """What the last stage of `dvc repro` or `dvc exp run` printed: the link stage's lines,
    after which DVC prints only its own."""
    lines = stdout.splitlines()
    assert LINK_COMMAND in lines, stdout[-3000:]
    start = lines.index(LINK_COMMAND) + 1
    after = lines[start:]
    assert not any(line.startswith("Running stage") for line in after), stdout[-3000:]
    end = next((i for i, line in enumerate(after) if line.startswith(DVC_TRAILING)), len(after))
    assert all(not line or line.startswith(DVC_TRAILING) for line in after[end:]), after[end:]
    return after[:end]


def files_in(directory: Path) -> list[str]:
    """The names in a directory, temporary files included; [] when it does not exist."""
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def mlflow_runs(repo: Path) -> list:
    """Every run in the repo's MLflow store, oldest first."""
    from mlflow import MlflowClient  # A second to import: only for the callers that need it.

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiment_ids, order_by=["attributes.start_time ASC"])


def run_statuses(repo: Path) -> dict[str, str]:
    """{run id: status}: a failed or killed stage must leave none RUNNING."""
    return {found.info.run_id: found.info.status for found in mlflow_runs(repo)}


# Servers on 127.0.0.1 ----------------------------------------------------------------------
# How long a background server may take to answer its ready URL.
START_TIMEOUT_S = 120


def answers_200(url: str) -> bool:
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200
    return False


@contextlib.contextmanager
def background(cmd: list[str], ready_url: str, log: Path, env: dict[str, str]) -> Iterator[None]:
    """Run a server in its own process group until ready_url answers 200; stop it afterwards."""
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            cmd,
            cwd=log.parent,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"{cmd[:3]} exited:\n{log.read_text()[-3000:]}"
            if answers_200(ready_url):
                break
            assert time.monotonic() < deadline, f"{cmd[:3]} not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, workdir: Path, env: dict[str, str], artifacts: str | None = None
) -> Iterator[str]:
    """`mlflow server` proxying artifacts (--serve-artifacts) into artifacts, a directory or an
    ``s3://`` URI (then env holds the AWS variables and MLFLOW_S3_ENDPOINT_URL), by default
    workdir/artifacts. Clients need no access to the artifacts: they go through the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts or str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with background(cmd, f"{url}/health", workdir / "server.log", env):
        yield url


# An S3-compatible server: moto's server mode, which speaks the S3 protocol to real clients
# (boto3 in MLflow's server, s3fs in dvc-s3). Credentials reach every client through the usual
# AWS variables; the secret key is new for each server, so that tests can look for it wherever
# it must not be.
ACCESS_KEY_ID = "AKIABIGRAMTESTS00001"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    secret_key: str

    @property
    def credentials(self) -> dict[str, str]:
        """The AWS variables every S3 client reads (boto3, s3fs, the AWS CLI)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3  # only where a test talks to the server

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object's key under prefix, as S3's ListObjectsV2 pages them."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[S3Server]:
    port = free_port()
    cmd = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir)}
    with background(cmd, f"http://127.0.0.1:{port}/moto-api/", workdir / "moto.log", env):
        yield S3Server(f"http://127.0.0.1:{port}", secrets.token_urlsafe(30))
