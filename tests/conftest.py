"""Shared fixtures: the real corpus served over HTTP on 127.0.0.1, and throwaway repo copies.

The real pipeline runs that many tests only read (prepared_repo, trained_run, trained_experiment,
experiments)
are made once per test run, whatever the number of pytest-xdist workers (built_once); each
worker then reads its own copy.

Tests never read the workspace's params.yaml, dvc.lock, data/ or mlflow.db, which the README's
commands change: they work on copies, with params.yaml as committed at HEAD. The plain helpers
these fixtures use, and tests import, live in tests/support/ and, where the benchmarks share
them, in testbed.py at the repository root.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from pipeline.errors import PipelineError
from pipeline.params import load_params
from pipeline.stages.download import corpus_source, download_verified
from testbed import (
    S3Server,
    commit_all,
    copy_repo_with_store,
    copy_trained_repo,
    make_fast_repo_copy,
    pipeline_env,
    run,
    s3_server,
    serve_directory,
    update_params,
    write_committed_params,
)
from tests.support.experiments import Experiments
from tests.support.models import make_workspace
from tests.support.servers import start_faulty_server
from tests.support.stages import exp_run, experiment_name

# The fixtures that run the real pipeline (dvc and its stages, in a repo copy): a test that uses
# one is an e2e test, marked or not, and `make test-fast` (-m "not e2e") leaves it out.
PIPELINE_FIXTURES = frozenset(
    {
        "prepared_repo",
        "prepared_copy",
        "trained_run",
        "trained_repo",
        "built_experiment",
        "trained_experiment",
        "experiments",
    }
)


# The modules that take longest, longest first (measured on CI's 2 cores, `make test` prints the
# slowest tests), in the order the workers start them: with --dist loadfile a module goes whole
# to the next free worker, so that the quick ones fill the gaps at the end instead of one long
# module running alone. test_faults comes second because it needs no trained repo: its worker
# works while the first builds the shared one. The order changes how well the workers are
# packed, never a result; a module not named here starts after these.
LONGEST_FIRST = (
    "test_queue",
    "test_faults",
    "test_views",
    "test_team_server",
    "test_pipeline_e2e",
    "test_mlflow_views",
    "test_disk_and_store_faults",
    "test_secrets",
    "test_sharing",
    "test_distributed",
    "test_share_experiments",
    "test_one_stage_per_job",
    "test_resume",
    "test_stage_imports",
    "test_stage_cli",
    "test_own_corpus",
    "test_cpu_kernels",
    "test_plots",
    "test_limits",
    "test_download",
    "test_rejected_experiments",
    "test_model_trust",
    "test_store_faults",
    "test_quiet",
    "test_run_summary",
)


def pytest_configure(config: pytest.Config) -> None:
    """Start every child with the stop signals a terminal gives it, however the suite was started.

    A program ignores at start what its parent ignored (`nohup` ignores SIGHUP; a shell without
    job control runs `cmd &` with SIGINT ignored) and so do its children after exec, the stages
    included, which rightly keep an ignored signal ignored. The tests that send a stage Ctrl-C or
    SIGHUP would then wait for a stage that never heard it. Any handler here, unlike SIG_IGN,
    becomes the default in a child.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use a pipeline fixture e2e; order the modules LONGEST_FIRST, then
    those holding an e2e test, then the rest (`make test` keeps this order for its workers:
    --no-loadscope-reorder)."""
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("e2e")}

    def start_order(item: pytest.Item) -> tuple[int, bool]:
        name = item.module.__name__.rpartition(".")[2]
        rank = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return rank, item.module.__name__ not in slow_modules

    items.sort(key=start_order)


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


@pytest.fixture(scope="session")
def corpus_url(shakespeare_corpus: Path) -> Iterator[str]:
    """The real corpus, served by a local HTTP server to the real download code."""
    with serve_directory(shakespeare_corpus.parent) as base_url:
        yield f"{base_url}/{shakespeare_corpus.name}"


@pytest.fixture
def repo_copy(tmp_path: Path, corpus_url: str) -> tuple[Path, dict[str, str]]:
    """A throwaway copy of the project with fast training params, committed to git."""
    return make_fast_repo_copy(tmp_path / "repo", corpus_url)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], str]) -> tuple[Path, str]:
    """A directory that build(directory) fills once per test run, however many pytest-xdist
    workers ask for it, and what build returned (a command's stdout).

    The first worker to ask builds it under a file lock in the run's shared temporary directory;
    the others wait on the lock, then reuse it. A build that failed is redone by the next one
    to ask, so that each gets the failure itself.
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    root.mkdir(exist_ok=True)
    directory, output = root / name, root / f"{name}.stdout"
    with FileLock(root / f"{name}.lock"):
        if not output.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            stdout = build(directory)
            output.write_text(stdout)
    return directory, output.read_text()


def private_copy(template: Path, tmp_path_factory, name: str) -> Path:
    """This worker's own copy of a shared repo, with its MLflow store: DVC and git commands
    lock the repo they run in, so that workers must not run them in the same one."""
    return copy_repo_with_store(template, tmp_path_factory.mktemp(name) / "repo")


@pytest.fixture(scope="session")
def prepared_repo(tmp_path_factory, corpus_url: str) -> tuple[Path, dict[str, str]]:
    """A repo copy where `dvc repro vocab` has run: corpus, tokens and an MLflow store exist."""

    def build(directory: Path) -> str:
        repo, env = make_fast_repo_copy(directory / "repo", corpus_url)
        result = run(["dvc", "repro", "vocab"], repo, env)
        commit_all(repo, env, "download and vocab")
        return result.stdout

    built, _ = built_once(tmp_path_factory, "prepared", build)
    return private_copy(built / "repo", tmp_path_factory, "prepared"), pipeline_env(corpus_url)


@pytest.fixture
def prepared_copy(prepared_repo, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of prepared_repo (seconds cheaper than running download and vocab again)."""
    template, env = prepared_repo
    return copy_repo_with_store(template, tmp_path / "repo"), dict(env)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_url: str) -> tuple[Path, dict[str, str], str]:
    """A repo copy after one `dvc repro` with fast params, then committed with its dvc.lock;
    and the stdout of that `dvc repro`.

    The run was made with a params change not yet committed (train.seed), as runs often are:
    its training run names the commit before HEAD. Read-only: tests work in their own copy
    (testbed.copy_trained_repo), sharing this one baseline run.
    """

    def build(directory: Path) -> str:
        repo, env = make_fast_repo_copy(directory / "repo", corpus_url)
        update_params(repo, train={"seed": 7})
        result = run(["dvc", "repro"], repo, env)
        commit_all(repo, env, "baseline run")
        return result.stdout

    built, stdout = built_once(tmp_path_factory, "trained", build)
    repo = private_copy(built / "repo", tmp_path_factory, "trained")
    return repo, pipeline_env(corpus_url), stdout


@pytest.fixture(scope="session")
def trained_repo(trained_run) -> tuple[Path, dict[str, str]]:
    """trained_run's repo and environment."""
    repo, env, _ = trained_run
    return repo, env


@pytest.fixture(scope="session")
def built_experiment(trained_repo, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """A copy of the trained repo (a new MLflow store) after one `dvc exp run -S train.lr=0.05`
    that trains, and that run's stdout: the one shared copy, which no test changes."""
    trained, env = trained_repo

    def build(directory: Path) -> str:
        return exp_run(copy_trained_repo(trained, directory / "repo"), env, "train.lr=0.05")[1]

    built, stdout = built_once(tmp_path_factory, "experiment", build)
    return built / "repo", env, stdout


@pytest.fixture(scope="session")
def trained_experiment(built_experiment, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """This worker's copy of built_experiment, with its stdout. Tests that run more work in a
    copy of their own (testbed.copy_repo_with_store)."""
    built, env, stdout = built_experiment
    return private_copy(built, tmp_path_factory, "experiment"), env, stdout


@pytest.fixture(scope="session")
def experiments(built_experiment, tmp_path_factory) -> Experiments:
    """built_experiment (train.lr 0.05), with its store, after two more `dvc exp run`s:
    train.lr 0.005, then 0.05 again, which DVC restores from its run-cache. Tests only read it."""
    experiment, env, experiment_stdout = built_experiment

    def build(directory: Path) -> str:
        repo = copy_repo_with_store(experiment, directory / "repo")
        second, _ = exp_run(repo, env, "train.lr=0.005")
        restored, stdout = exp_run(repo, env, "train.lr=0.05")
        (directory / "names.json").write_text(json.dumps([second, restored]))
        return stdout  # the restored one's

    built, restored_stdout = built_once(tmp_path_factory, "experiments", build)
    second, restored = json.loads((built / "names.json").read_text())
    repo = private_copy(built / "repo", tmp_path_factory, "experiments")
    first = experiment_name(experiment_stdout)
    return Experiments(repo, env, first, second, restored, restored_stdout)


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3-compatible server on 127.0.0.1, one per worker (tests.support.s3); each test
    makes its own bucket."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def faulty_server(shakespeare_corpus) -> Iterator[http.server.ThreadingHTTPServer]:
    """A corpus server on 127.0.0.1 with a path for every fault (tests.support.servers)."""
    with start_faulty_server(shakespeare_corpus.read_bytes()) as server:
        yield server


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A project directory holding params.yaml, a vocabulary and a model.pt, as the train stage
    leaves them, and the current directory; the MLflow store (mlflow.db) goes there too."""
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path
