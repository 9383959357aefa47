"""Shared fixtures: the real corpus served over HTTP on 127.0.0.1, and throwaway repo copies.

Tests never read the workspace's params.yaml, dvc.lock, data/ or mlflow.db, which the README's
commands change: they work on copies, with params.yaml as committed at HEAD.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.download import corpus_source, download_verified
from pipeline.errors import PipelineError
from pipeline.params import CORPUS_URL_ENV, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
VENV_BIN = Path(sys.executable).parent


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


@pytest.fixture(scope="session")
def shakespeare_corpus(tmp_path_factory) -> Path:
    """Tiny Shakespeare, fetched once per test run by the download stage's own code: from
    $BIGRAM_CORPUS_URL when set (a mirror, a file:// URL or a path), else from data.url, and
    verified against data.sha256."""
    directory = tmp_path_factory.mktemp("corpus")
    data = load_params(write_committed_params(directory)).data
    path = directory / "input.txt"
    try:
        download_verified(corpus_source(data), data.sha256, path)
    except PipelineError as error:
        failure = str(error)
    else:
        return path
    # Outside the except block, so that the report is this one line, not a chain of tracebacks.
    # Once per run: pytest hands the same failure to every test that needs the corpus.
    pytest.fail(f"cannot fetch the test corpus: {failure}", pytrace=False)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
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


@pytest.fixture(scope="session")
def corpus_url(shakespeare_corpus: Path) -> Iterator[str]:
    """The real corpus, served by a local HTTP server to the real download code."""
    with serve_directory(shakespeare_corpus.parent) as base_url:
        yield f"{base_url}/{shakespeare_corpus.name}"


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
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


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
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "--allow-empty", "-m", message], repo, env)


# Few iterations keep the end-to-end runs short; the real defaults are checked elsewhere.
FAST_TRAIN = {"max_iters": 300, "eval_interval": 100, "lr": 0.02}


def make_fast_repo_copy(destination: Path, corpus_url: str) -> tuple[Path, dict[str, str]]:
    env = pipeline_env(corpus_url)
    repo = make_repo_copy(destination, env)
    update_params(repo, train=FAST_TRAIN, sample={"num_chars": 200})
    commit_all(repo, env, "fast params for tests")
    return repo, env


@pytest.fixture
def repo_copy(tmp_path: Path, corpus_url: str) -> tuple[Path, dict[str, str]]:
    """A throwaway copy of the project with fast training params, committed to git."""
    return make_fast_repo_copy(tmp_path / "repo", corpus_url)


def free_port() -> int:
    """A port nobody listens on right now (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def prepared_repo(tmp_path_factory, corpus_url: str) -> tuple[Path, dict[str, str]]:
    """A repo copy where `dvc repro vocab` has run: corpus, tokens and an MLflow store exist."""
    repo, env = make_fast_repo_copy(tmp_path_factory.mktemp("prepared") / "repo", corpus_url)
    run(["dvc", "repro", "vocab"], repo, env)
    commit_all(repo, env, "download and vocab")
    return repo, env


@pytest.fixture
def prepared_copy(prepared_repo, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of prepared_repo (seconds cheaper than running download and vocab again)."""
    template, env = prepared_repo
    repo = tmp_path / "repo"
    shutil.copytree(template, repo, symlinks=True)
    # The store records the experiment's artifact directory as an absolute path; point it at the
    # copy's own, so that artifacts logged here do not land in the template.
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as db, db:
        db.execute(
            "UPDATE experiments SET artifact_location = ?", ((repo / "mlartifacts").as_uri(),)
        )
    return repo, dict(env)


def run_stage(stage: str, repo: Path, env: dict[str, str], timeout: int = 120):
    """Run one stage as DVC would (`python -m pipeline.<stage>` in the repo), not checked."""
    return run([sys.executable, "-m", f"pipeline.{stage}"], repo, env, check=False, timeout=timeout)


def assert_one_line_error(result, *mentions: str) -> str:
    """A failed stage: non-zero exit, stderr exactly one `error: ...` line naming every mention."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])
    return lines[0]


def files_in(directory: Path) -> list[str]:
    """The names in a directory, temporary files included; [] when it does not exist."""
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def mlflow_runs(repo: Path) -> list:
    """Every run in the repo's MLflow store, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiment_ids, order_by=["attributes.start_time ASC"])


def run_statuses(repo: Path) -> dict[str, str]:
    """{run id: status}: a failed or killed stage must leave none RUNNING."""
    return {found.info.run_id: found.info.status for found in mlflow_runs(repo)}


# Left out of copies of a trained repo: each copy gets its own MLflow store and DVC state.
NOT_COPIED = {"mlflow.db", "mlflow.db-wal", "mlflow.db-shm", "mlflow.db.lock", "mlartifacts", "tmp"}


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory, corpus_url: str) -> tuple[Path, dict[str, str]]:
    """A repo copy after one `dvc repro` with fast params, then committed with its dvc.lock.

    The run was made with a params change not yet committed (train.seed), as runs often are.
    Read-only: tests work in their own copy (copy_trained_repo), sharing this one baseline run.
    """
    repo, env = make_fast_repo_copy(tmp_path_factory.mktemp("trained") / "repo", corpus_url)
    update_params(repo, train={"seed": 7})
    run(["dvc", "repro"], repo, env)
    commit_all(repo, env, "baseline run")
    return repo, env


def copy_trained_repo(trained: Path, destination: Path) -> Path:
    """The trained repo with its git history, DVC cache and outputs, but a new MLflow store."""
    shutil.copytree(trained, destination, ignore=lambda _dir, names: NOT_COPIED & set(names))
    return destination
