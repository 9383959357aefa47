"""Faults past the download: bad corpora, interrupted training, broken MLflow stores, models
that do not fit the vocabulary, and the temporary files of killed writers.

Each stage runs as its own process in a copy of a repo where download and vocab have run, and
the checks are those a user sees: exit status, one `error:` line, output files, MLflow runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.secrets import masked
from pipeline.stages.vocab import count_characters
from testbed import (
    VENV_BIN,
    assert_one_line_error,
    files_in,
    free_port,
    mlflow_runs,
    run,
    run_stage,
    run_statuses,
    update_params,
)
from tests.support.stages import ENDLESS_TRAINING, start_and_wait_for_training
from tests.support.store import train_runs

# Corpus ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("corpus", "expected"),
    [
        (
            b"First Citizen:\n\xff\xfe\n",
            "data/raw/input.txt is not UTF-8 text (bad byte at offset 15)",
        ),
        (b"", "data/raw/input.txt holds 0 characters: it needs at least 2"),
        (b"ab", "data/raw/input.txt is too short (2 characters) to split with data.train_fraction"),
        # The vocab stage used to accept it, and train to refuse it with a fix that rebuilt it.
        (
            b"a" * 1000,
            "data/raw/input.txt holds a single distinct character ('a'): a bigram model needs at "
            "least 2; train on another corpus: point data.url and data.sha256 at it",
        ),
    ],
    ids=["not-utf8", "empty", "too-short-to-split", "one-distinct-character"],
)
def test_the_vocab_stage_rejects_a_bad_corpus(prepared_copy, corpus, expected):
    repo, env = prepared_copy
    (repo / "data/raw/input.txt").write_bytes(corpus)

    result = run_stage("vocab", repo, env)

    assert_one_line_error(result, expected)
    assert files_in(repo / "data/vocab") == [], "no stale or partial token files may remain"
    failed = mlflow_runs(repo)[-1]
    assert failed.data.tags["stage"] == "vocab" and failed.info.status == "FAILED"


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 1 << 20])
@pytest.mark.parametrize(
    ("corpus", "bad_offset"),
    [
        ("é".encode() * 10 + b"\xff!", 20),  # a byte that starts no character
        (b"ab\xc3(cd", 2),  # a character cut short by the next one
        ("é".encode() * 10 + b"\xe2\x82", 20),  # the file ends inside a character
    ],
    ids=["invalid-byte", "cut-short", "ends-inside"],
)
def test_a_non_utf8_corpus_names_the_first_bad_byte(tmp_path, corpus, bad_offset, chunk_bytes):
    path = tmp_path / "input.txt"
    path.write_bytes(corpus)
    with pytest.raises(PipelineError, match=rf"not UTF-8 text \(bad byte at offset {bad_offset}\)"):
        count_characters(path, chunk_bytes)


def test_the_train_stage_rejects_a_corpus_too_short_for_one_batch(prepared_copy):
    repo, env = prepared_copy
    (repo / "data/raw/input.txt").write_text("To be, or not to be, that is the question\n")
    assert run_stage("vocab", repo, env).returncode == 0  # 37 train and 5 val tokens

    result = run_stage("train", repo, env)

    assert_one_line_error(
        result, "param 'train.block_size' must be shorter than the smaller split (5 tokens), got 8"
    )
    # Refused before training: nothing written, and the loss curve git holds left as it was.
    assert files_in(repo / "data/train") == ["loss_curve.csv"]
    run(["git", "diff", "--exit-code", "--", "data/train"], repo, env)
    assert "RUNNING" not in run_statuses(repo).values()


# Interrupted training ----------------------------------------------------------------------


def test_sigterm_during_training_ends_the_run_killed_and_writes_no_model(prepared_copy):
    repo, env = prepared_copy
    update_params(repo, train=ENDLESS_TRAINING)
    training = start_and_wait_for_training(
        [sys.executable, "-m", "pipeline.stages.train"], repo, env
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(training.kill)
        training.send_signal(signal.SIGTERM)
        _, stderr = training.communicate(timeout=60)

    assert training.returncode == 130
    assert stderr.strip() == (
        "error: stopped by signal SIGTERM; no partial output was left, rerun the stage"
    )
    assert files_in(repo / "data/train") == [], "no model, no curve, no temporary file"
    [killed] = train_runs(repo)
    assert killed.info.status == "KILLED"


@pytest.mark.e2e
def test_ctrl_c_during_dvc_repro_ends_the_run_killed_and_the_next_repro_succeeds(prepared_copy):
    repo, env = prepared_copy
    update_params(repo, train=ENDLESS_TRAINING)
    repro = start_and_wait_for_training(["dvc", "repro"], repo, env)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(repro.kill)
        # Ctrl-C in a terminal signals the whole foreground process group: dvc and the stage.
        os.killpg(repro.pid, signal.SIGINT)
        _, stderr = repro.communicate(timeout=60)

    assert repro.returncode != 0
    assert "error: stopped by Ctrl-C (SIGINT)" in stderr and "Traceback" not in stderr
    assert files_in(repo / "data/train") == []
    [killed] = train_runs(repo)
    assert killed.info.status == "KILLED"

    update_params(repo, train={"max_iters": 100, "eval_interval": 50})
    run(["dvc", "repro"], repo, env)

    assert (repo / "data/train/model.pt").is_file() and (repo / "data/sample/sample.txt").is_file()
    statuses = run_statuses(repo)
    assert statuses[killed.info.run_id] == "KILLED" and "RUNNING" not in statuses.values()
    assert [found.info.status for found in train_runs(repo)] == ["KILLED", "FINISHED"]


# Training that goes wrong ------------------------------------------------------------------

# AdamW's weight decay (0.01) scales the table by 1 - lr * 0.01 = -9 each step at lr 1000: it
# overflows float32 within 50 steps, so the loss is NaN at step 100, the first eval after 0.
DIVERGING_LR = 1000.0


def test_training_that_diverges_fails_at_its_first_non_finite_eval_point(prepared_copy):
    repo, env = prepared_copy
    update_params(repo, train={"lr": DIVERGING_LR})
    metrics_before = (repo / "data/evaluate/metrics.json").read_bytes()

    result = run_stage("train", repo, env)

    assert_one_line_error(
        result,
        "training diverged: at step 100 the train loss is nan",
        "lower train.lr (now 1000)",
        "no model was saved or registered",
    )
    assert "step 0:" in result.stdout and "step 100:" not in result.stdout
    assert files_in(repo / "data/train") == [], "no model.pt, no curve, no run.json"
    assert (repo / "data/evaluate/metrics.json").read_bytes() == metrics_before
    [failed] = train_runs(repo)
    assert failed.info.status == "FAILED"
    assert all(math.isfinite(value) for value in failed.data.metrics.values())
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert client.search_logged_models([failed.info.experiment_id]) == []
    assert client.search_model_versions() == [], "no version, so no @challenger alias either"


def test_a_model_with_non_finite_weights_gives_no_metrics(prepared_copy):
    repo, env = prepared_copy
    metrics_before = (repo / "data/evaluate/metrics.json").read_bytes()
    diverged = BigramLanguageModel(65)
    with torch.no_grad():
        diverged.token_embedding_table.weight[3, 5] = math.nan
    model_path = repo / "data/train/model.pt"
    model_path.parent.mkdir(exist_ok=True)  # git holds data/train/loss_curve.csv
    torch.save(diverged.state_dict(), model_path)
    runs_before = run_statuses(repo)

    result = run_stage("evaluate", repo, env)

    assert_one_line_error(
        result, "data/train/model.pt gives train_loss nan", "rerun `dvc repro train`"
    )
    assert (repo / "data/evaluate/metrics.json").read_bytes() == metrics_before
    assert run_statuses(repo) == runs_before


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_json_outputs_refuse_nan_and_infinity_and_keep_the_previous_file(tmp_path, value):
    metrics = tmp_path / "metrics.json"
    write_json(metrics, {"val_loss": 2.5})
    previous = metrics.read_bytes()

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(metrics, {"val_loss": value})

    assert metrics.read_bytes() == previous and json.loads(previous) == {"val_loss": 2.5}
    assert files_in(tmp_path) == ["metrics.json"], "no temporary file left"


# Runs the train stage as `python -m pipeline.stages.train` does, with its address space capped
# (RLIMIT_AS) at what its modules take plus argv[1] bytes: past that, malloc fails, which the
# CPU allocator reports as "DefaultCPUAllocator: can't allocate memory".
MEMORY_CAPPED_TRAIN = """
import resource, runpy, sys
import pipeline.stages.train
# Its imports stay loaded; runpy runs it afresh as __main__.
sys.modules.pop("pipeline.stages.train")
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["pipeline.stages.train"]
runpy.run_module("pipeline.stages.train", run_name="__main__", alter_sys=True)
"""
# Enough for the stage to start its run and train on small batches (it takes about 300 MB past
# its imports), far from the 800 MB more a batch of 16,777,216 tokens takes.
TRAINING_HEADROOM_BYTES = 640 << 20


def test_an_out_of_memory_in_training_names_the_params_to_shrink(prepared_copy):
    repo, env = prepared_copy
    # The largest batch the params allow: 2,097,152 x 8 tokens.
    update_params(repo, train={"batch_size": 2_097_152, "block_size": 8, "device": "cpu"})

    result = run(
        [sys.executable, "-c", MEMORY_CAPPED_TRAIN, str(TRAINING_HEADROOM_BYTES)],
        repo,
        env,
        check=False,
        timeout=300,
    )

    assert_one_line_error(
        result,
        "out of memory while training (could not allocate ",
        "lower train.batch_size or train.block_size (now 2,097,152 x 8 = 16,777,216 tokens",
        "data.max_vocab_size",
    )
    assert "step 0:" in result.stdout, "the stage got as far as training"
    assert files_in(repo / "data/train") == []
    [failed] = train_runs(repo)
    assert failed.info.status == "FAILED"


# Vocabulary ---------------------------------------------------------------------------------

# 70,000 characters of the supplementary planes: each V x V count table would take 40 GB.
FAR_TOO_MANY = [chr(code) for code in range(0x10000, 0x10000 + 70_000)]


@pytest.mark.parametrize(
    ("stage", "edit", "expected"),
    [
        (
            "train",
            lambda chars: chars[:-1],
            "data/vocab/train.npy holds token id 64 but data/vocab/vocab.json lists only 64",
        ),
        (
            "train",
            lambda chars: [*chars, "é"],
            "data/vocab/vocab.json lists 66 characters but the token files use only 65",
        ),
        (
            "train",
            lambda chars: chars + FAR_TOO_MANY,
            "data/vocab/vocab.json lists 70,065 characters, above data.max_vocab_size = 4,096",
        ),
        (
            "evaluate",
            lambda chars: chars[:-1],
            "data/vocab/train.npy holds token id 64 but data/vocab/vocab.json lists only 64",
        ),
    ],
    ids=["a-character-removed", "a-character-added", "above-max-vocab-size", "evaluate"],
)
def test_a_vocabulary_that_disagrees_with_the_token_files_is_named_with_the_fix(
    prepared_copy, stage, edit, expected
):
    repo, env = prepared_copy
    vocab_path = repo / "data/vocab/vocab.json"
    write_json(vocab_path, {"chars": edit(json.loads(vocab_path.read_text())["chars"])})
    previous_model = repo / "data/train/model.pt"
    previous_model.parent.mkdir(exist_ok=True)  # git holds data/train/loss_curve.csv
    torch.save(BigramLanguageModel(65).state_dict(), previous_model)
    before = previous_model.read_bytes(), (repo / "data/evaluate/metrics.json").read_bytes()
    runs_before = run_statuses(repo)

    result = run_stage(stage, repo, env)

    assert_one_line_error(result, expected, "rerun `dvc repro --force vocab`")
    after = previous_model.read_bytes(), (repo / "data/evaluate/metrics.json").read_bytes()
    assert after == before, "the previous outputs must stay"
    assert run_statuses(repo) == runs_before, "no run is started for inputs that disagree"


# Tracking store ----------------------------------------------------------------------------


def test_a_tracking_server_on_a_closed_port_is_named_within_seconds(prepared_copy):
    repo, env = prepared_copy
    uri = f"http://127.0.0.1:{free_port()}"
    env["MLFLOW_TRACKING_URI"] = uri

    # MLflow alone retries for minutes; the time limit here is that of a hang, not a benchmark.
    result = run_stage("vocab", repo, env, timeout=60)

    assert_one_line_error(result, f"MLflow tracking server {uri} is unreachable", "Connection")


def test_passwords_are_masked_in_shown_uris():
    assert masked("postgresql://bob:s3cret@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    assert masked("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def assert_store_refused(repo: Path, env: dict, *mentions: str) -> None:
    store = repo / "mlflow.db"
    before = store.read_bytes()
    result = run_stage("vocab", repo, env)
    assert_one_line_error(result, f"MLflow store {store}", *mentions)
    assert store.read_bytes() == before, "the store must be left exactly as it was"


def test_a_corrupt_store_is_named_and_left_untouched(prepared_copy):
    repo, env = prepared_copy
    (repo / "mlflow.db").write_bytes(b"\x00not a database\xff" * 512)
    assert_store_refused(repo, env, "is not a SQLite database")


@pytest.mark.parametrize("cut", ["half", "last-100-bytes"])
def test_a_truncated_store_is_named_and_left_untouched(prepared_copy, cut):
    repo, env = prepared_copy
    store = repo / "mlflow.db"
    assert not Path(f"{store}-wal").exists(), "the template's store should be checkpointed"
    size = store.stat().st_size
    # SQLite itself reads a store missing only its last bytes without complaint.
    os.truncate(store, size // 2 if cut == "half" else size - 100)
    assert_store_refused(repo, env, "is truncated", "restore it from a backup")


@pytest.mark.e2e
def test_a_store_of_an_older_schema_asks_for_mlflow_db_upgrade_which_then_works(prepared_copy):
    repo, env = prepared_copy
    store = repo / "mlflow.db"
    earlier_runs = run_statuses(repo)
    # A real older store: MLflow's own migration scripts take the schema one revision back.
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    command.downgrade(_get_alembic_config(f"sqlite:///{store}"), "-1")

    assert_store_refused(repo, env, "has schema", f"`mlflow db upgrade sqlite:///{store}`")

    run([str(VENV_BIN / "mlflow"), "db", "upgrade", f"sqlite:///{store}"], repo, env)
    assert run_stage("vocab", repo, env).returncode == 0
    statuses = run_statuses(repo)
    assert {run_id: statuses[run_id] for run_id in earlier_runs} == earlier_runs
    assert len(statuses) == len(earlier_runs) + 1


# Models ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "output"), [("evaluate", "data/evaluate/metrics.json"), ("sample", "data/sample")]
)
def test_a_model_of_another_vocabulary_is_rejected_naming_both_shapes(prepared_copy, stage, output):
    repo, env = prepared_copy
    (repo / "data/evaluate/metrics.json").unlink()  # committed in git: none may be written
    model_path = repo / "data/train/model.pt"
    model_path.parent.mkdir(parents=True, exist_ok=True)  # git holds data/train/loss_curve.csv
    torch.save(BigramLanguageModel(10).state_dict(), model_path)
    write_json(repo / "data/train/run.json", {"mlflow_run_id": "0" * 32})

    result = run_stage(stage, repo, env)

    assert_one_line_error(result, "data/train/model.pt", "(10, 10)", "(65, 65)")
    assert not (repo / output).exists()


# Temporary files ---------------------------------------------------------------------------


def dead_pid() -> int:
    """The id of a process that has exited (ids are not reused this quickly)."""
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(finished.stdout)


def test_atomic_writes_leave_the_whole_file_or_nothing(tmp_path):
    output = tmp_path / "out/model.pt"
    with pytest.raises(RuntimeError), atomic_path(output) as tmp:
        tmp.write_bytes(b"half a mod")
        raise RuntimeError("killed mid-write")
    assert files_in(output.parent) == []

    with atomic_path(output) as tmp:
        tmp.write_bytes(b"a whole model")
    assert files_in(output.parent) == ["model.pt"] and output.read_bytes() == b"a whole model"


def test_atomic_writes_give_outputs_the_usual_file_mode(tmp_path):
    # The temporary file is private while written; the output follows the umask like open().
    previous = os.umask(0o022)
    try:
        reference = tmp_path / "plain.txt"
        reference.write_text("x")
        with atomic_path(tmp_path / "atomic.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    output = tmp_path / "input.txt"
    stale = tmp_path / f".input.txt.{dead_pid()}.abc123.tmp"
    live = tmp_path / f".input.txt.{os.getpid()}.def456.tmp"  # A writer still at work.
    other = tmp_path / f".input.txt.{dead_pid()}.ghi789.tmp.keep"
    for path in (stale, live, other):
        path.write_bytes(b"partial")

    with atomic_path(output) as tmp:
        tmp.write_text("complete")

    assert files_in(tmp_path) == sorted([live.name, other.name, "input.txt"])
    assert output.read_text() == "complete"
