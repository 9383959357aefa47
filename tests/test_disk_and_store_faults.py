"""Faults of the machine and of files on it: a full disk, a file size limit, a store this user
cannot write or SQLite cannot open, damaged intermediate files, and a repository that moved.

Each fault is real: a small tmpfs mounted over an output directory, RLIMIT_FSIZE on the stage's
process, file modes enforced by the kernel (for root too, by dropping the capabilities that let
root pass them), files truncated or emptied on disk.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.cli import disk_full_message
from pipeline.errors import disk_full_cause
from testbed import (
    assert_one_line_error,
    files_in,
    mlflow_runs,
    run,
    run_stage,
    run_statuses,
    update_params,
)
from tests.support.faults import (
    FILLER,
    file_size_limit,
    full_file_system,
    without_permission_override,
)

# Full disk ---------------------------------------------------------------------------------


def assert_disk_full_error(result, path: str, after_mlflow_logs: bool = False) -> None:
    """One error line naming the file; after_mlflow_logs: MLflow's own warnings and progress
    bars, which logging a model prints, may come before it."""
    if after_mlflow_logs:
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot write {path}") and "free space" in line, line
    else:
        line = assert_one_line_error(result, f"cannot write {path}", "free space")
    assert "No space left on device" in line or "File too large" in line, line


@pytest.mark.parametrize(
    ("stage", "directory", "named"),
    [
        ("download", "data/raw", "data/raw/input.txt"),
        # Either token file: both are open, and closing the other fails too.
        ("vocab", "data/vocab", "data/vocab/"),
        ("train", "data/train", "data/train/model.pt"),
    ],
)
def test_a_full_disk_names_the_file_and_leaves_no_partial_output(
    prepared_copy, stage, directory, named
):
    repo, env = prepared_copy
    before = {name: (repo / directory / name).read_bytes() for name in files_in(repo / directory)}
    with full_file_system(repo / directory, free_bytes=8 * 1024) as full:
        result = run_stage(stage, repo, env)

        assert_disk_full_error(result, named)
        left = {name: (full / name).read_bytes() for name in files_in(full) if name != FILLER}
    if stage == "download":
        # The stage writes nothing until the corpus is verified: the previous one stays.
        assert left == before
    else:
        assert left == {}, "a failed stage removes its outputs: none stale, none partial"
    [failed] = [r for r in mlflow_runs(repo) if r.data.tags["stage"] == stage][-1:]
    assert failed.info.status == "FAILED"
    assert "RUNNING" not in run_statuses(repo).values()


def test_a_full_artifact_store_leaves_no_half_written_model(prepared_copy):
    """The register stage logs the models into the artifact store; it fills up on the way."""
    repo, env = prepared_copy
    for stage in ("train", "evaluate"):
        assert run_stage(stage, repo, env).returncode == 0
    artifacts = repo / "mlartifacts"
    with full_file_system(artifacts, free_bytes=24 * 1024):
        result = run_stage("register", repo, env)

        assert_disk_full_error(result, str(artifacts), after_mlflow_logs=True)
        runs = {r.data.tags["stage"]: r for r in mlflow_runs(repo)}
        registering, training = runs["register"], runs["train"]
        client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
        models = client.search_logged_models(
            [registering.info.experiment_id],
            filter_string=f"source_run_id = '{registering.info.run_id}'",
        )
        assert models, "the stage got as far as logging a model"
        for model in models:
            if model.status != "READY":
                assert str(model.status) == "FAILED"
                model_dir = Path(model.artifact_location.removeprefix("file://")).parent
                assert not model_dir.exists(), f"half-written model left at {model_dir}"
    assert registering.info.status == "FAILED"
    assert training.info.status == "FINISHED", "a failed registration leaves training as it was"
    assert client.search_model_versions() == []
    assert files_in(repo / "data/register") == []


def test_a_file_size_limit_during_download_is_a_full_disk_not_a_broken_transfer(prepared_copy):
    """Where mounting is not allowed this still runs: RLIMIT_FSIZE makes writes fail (EFBIG)."""
    repo, env = prepared_copy
    before = (repo / "data/raw/input.txt").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        # The corpus is 1.1 MB; the store and its journal stay under this while the stage runs.
        preexec_fn=file_size_limit(1 << 19),
    )
    assert_disk_full_error(result, "data/raw/input.txt")
    assert "broke off" not in result.stderr
    assert (repo / "data/raw/input.txt").read_bytes() == before
    assert files_in(repo / "data/raw") == ["download.json", "input.txt"]


def code_tree(root: Path) -> Path:
    """A package to copy, as MLflow copies a logged model's code: a subdirectory, a large file."""
    (root / "pipeline" / "lm").mkdir(parents=True)
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / "lm" / "bigram.py").write_bytes(b"#" * 200_000)
    return root


def test_a_full_disk_inside_shutils_list_of_copy_errors_is_found(tmp_path):
    """shutil.copytree, which MLflow copies a model's code into TMPDIR with, gathers each file's
    OSError as text into one shutil.Error: the ENOSPC is in its list, not on the chain."""
    source = code_tree(tmp_path / "code")
    with full_file_system(tmp_path / "tmp", free_bytes=0) as full:
        with pytest.raises(shutil.Error) as raised:
            shutil.copytree(source, full / "model" / "code")
        target = full / "model/code/pipeline/lm/bigram.py"

        found = disk_full_cause(raised.value)

        assert found is not None and found.errno == errno.ENOSPC
        assert disk_full_message(found).startswith(
            f"cannot write {target} (No space left on device): free space"
        )


# Copies a tree under a file size limit and prints what disk_full_cause found in the error.
COPY_UNDER_A_SIZE_LIMIT = """
import shutil, sys
from pipeline.errors import disk_full_cause
try:
    shutil.copytree(sys.argv[1], sys.argv[2])
except shutil.Error as error:
    found = disk_full_cause(error)
    print("none" if found is None else f"{found.errno} {found.filename}")
"""


def test_a_file_size_limit_inside_shutils_list_of_copy_errors_is_found(tmp_path):
    """The same where mounting is not allowed: RLIMIT_FSIZE makes the copy fail with EFBIG."""
    source = code_tree(tmp_path / "code")
    copied = subprocess.run(
        [sys.executable, "-c", COPY_UNDER_A_SIZE_LIMIT, str(source), str(tmp_path / "copy")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=file_size_limit(1 << 16),
    )
    assert copied.returncode == 0, copied.stderr
    too_large = tmp_path / "copy/pipeline/lm/bigram.py"
    assert copied.stdout.split() == [str(errno.EFBIG), str(too_large)]


# The MLflow store --------------------------------------------------------------------------


def run_with_file_modes(stage: str, repo: Path, env: dict):
    """Run a stage with the file modes enforced, as for any user (root bypasses them)."""
    return run(
        [*without_permission_override(), sys.executable, "-m", f"pipeline.stages.{stage}"],
        repo,
        env,
        check=False,
    )


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("store-read-only", "is not readable and writable by this user"),
        ("store-unreadable", "is not readable and writable by this user"),
        ("directory-not-writable", "is read-only or not writable by this user"),
    ],
)
def test_a_store_this_user_cannot_write_is_named_and_left_untouched(prepared_copy, fault, expected):
    repo, env = prepared_copy
    store = repo / "mlflow.db"
    before = store.read_bytes()
    runs_before = run_statuses(repo)
    if fault == "store-read-only":
        store.chmod(0o444)
    elif fault == "store-unreadable":
        store.chmod(0o000)
    else:
        repo.chmod(0o555)

    try:
        result = run_with_file_modes("vocab", repo, env)
    finally:
        repo.chmod(0o755)
        store.chmod(0o644)

    assert_one_line_error(result, str(store.parent if "directory" in fault else store), expected)
    assert store.read_bytes() == before
    assert run_statuses(repo) == runs_before
    assert files_in(repo / "data/vocab") == sorted(
        ["manifest.json", "train.npy", "val.npy", "vocab.json"]
    )


def test_a_store_on_a_read_only_file_system_is_named(prepared_copy, tmp_path):
    """Root passes every file mode, but not a read-only mount."""
    repo, env = prepared_copy
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    shutil.copy(repo / "mlflow.db", store_dir / "mlflow.db")
    with full_file_system(store_dir, free_bytes=1 << 20):
        subprocess.run(["mount", "-o", "remount,ro", str(store_dir)], check=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store_dir / 'mlflow.db'}"

        result = run_stage("vocab", repo, env)

        assert_one_line_error(result, f"MLflow store directory {store_dir} is read-only")


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_a_sqlite_uri_without_a_file_is_refused(prepared_copy, uri):
    repo, env = prepared_copy
    env["MLFLOW_TRACKING_URI"] = uri
    listed = sorted(path.name for path in repo.iterdir())

    result = run_stage("vocab", repo, env)

    assert_one_line_error(result, f"MLFLOW_TRACKING_URI={uri} names no database file")
    assert sorted(path.name for path in repo.iterdir()) == listed, "no sqlite: files made"


def test_a_sqlite_store_under_a_file_is_refused(prepared_copy):
    repo, env = prepared_copy
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'params.yaml' / 'mlflow.db'}"

    result = run_stage("vocab", repo, env)

    assert_one_line_error(result, f"{repo / 'params.yaml'} is not a directory")


# Damaged intermediate files ----------------------------------------------------------------

PREVIOUS_TRAIN_OUTPUTS = {
    "model.pt": b"the previous model",
    "loss_curve.csv": b"step,train_loss,val_loss\n",
    "run.json": b'{"mlflow_run_id": "previous"}\n',
}


@pytest.mark.parametrize(
    ("stage", "damaged", "content", "expected"),
    [
        ("train", "data/vocab/train.npy", b"", "data/vocab/train.npy is not a token file"),
        ("train", "data/vocab/val.npy", b"\x93NUMPY", "data/vocab/val.npy is not a token file"),
        ("train", "data/vocab/manifest.json", b"{}", "has no valid 'corpus_sha256'"),
        ("train", "data/vocab/vocab.json", b"{}", "data/vocab/vocab.json has no valid 'chars'"),
        ("train", "data/vocab/vocab.json", b'{"chars": ["a", "a"]}', "is not a vocabulary"),
        ("vocab", "data/raw/download.json", b"{}", "data/raw/download.json has no valid"),
        ("vocab", "data/raw/download.json", b"", "data/raw/download.json is not valid JSON"),
    ],
    ids=[
        "zero-byte-train-npy",
        "header-only-val-npy",
        "empty-manifest",
        "empty-vocab",
        "vocab-with-duplicates",
        "empty-download-info",
        "zero-byte-download-info",
    ],
)
def test_a_damaged_input_fails_before_the_previous_outputs_are_touched(
    prepared_copy, stage, damaged, content, expected
):
    repo, env = prepared_copy
    for name, previous in PREVIOUS_TRAIN_OUTPUTS.items():
        (repo / "data/train").mkdir(exist_ok=True)
        (repo / "data/train" / name).write_bytes(previous)
    outputs = repo / ("data/train" if stage == "train" else "data/vocab")
    before = {name: (outputs / name).read_bytes() for name in files_in(outputs)}
    runs_before = run_statuses(repo)
    (repo / damaged).write_bytes(content)

    result = run_stage(stage, repo, env)

    line = assert_one_line_error(result, expected)
    assert "rerun `dvc repro --force" in line
    after = {name: (outputs / name).read_bytes() for name in files_in(outputs)}
    assert after == before, "the previous good outputs must stay"
    assert run_statuses(repo) == runs_before, "no MLflow run is started for a damaged input"


# A moved repository ------------------------------------------------------------------------


def test_a_moved_repository_is_named_with_the_fix(prepared_copy, tmp_path):
    repo, env = prepared_copy
    moved = tmp_path / "moved"
    shutil.move(repo, moved)
    update_params(moved, train={"max_iters": 10, "eval_interval": 5})

    stage = run_stage("vocab", moved, env)
    lookup = run(
        [sys.executable, "-m", "pipeline.generate", "--model", "models:/bigram-shakespeare/1"],
        moved,
        env,
        check=False,
    )

    for result in (stage, lookup):
        assert_one_line_error(
            result,
            f"in {repo / 'mlartifacts'}, not beside it",
            f"was moved from {repo}",
            "move mlflow.db and mlartifacts/ aside",
        )
    assert not repo.exists(), "the old location must not be recreated"
