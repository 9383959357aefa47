"""`python -m pipeline.leaderboard` on a real SQLite store holding runs as the stages log them:
every evaluated training run of every experiment, lowest val loss first, as Markdown."""

from __future__ import annotations

import math
import subprocess
import sys

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from testbed import REPO_ROOT

START_MS = 1_790_000_000_000
BIGRAM = {"model.type": "bigram", "train.lr": "0.01", "train.lr_schedule": "constant"}
MINIBATCH = {"train.method": "minibatch", "train.max_iters": "3000", "train.batch_size": "32"}
SMALL_GPT = {
    "model.type": "gpt",
    "model.n_layer": "3",
    "model.n_head": "4",
    "model.n_embd": "32",
    "model.dropout": "0.0",
    "train.lr": "0.001",
    "train.lr_schedule": "constant",
    "train.max_iters": "5000",
}
BABY_GPT = {
    **SMALL_GPT,
    "model.n_layer": "4",
    "model.n_embd": "128",
    "model.dropout": "0.2",
    "train.lr_schedule": "cosine",
    "train.max_iters": "2000",
    "train.batch_size": "12",
    "train.block_size": "64",
}


def training_run(client, experiment_id, name, params, val_loss, seconds, status="FINISHED"):
    """A training run with the params the train stage logs and the metrics evaluate adds."""
    defaults = {
        "train.method": "minibatch",
        "train.max_iters": "3000",
        "train.batch_size": "32",
        "train.block_size": "8",
    }
    params = defaults | params
    run = client.create_run(
        experiment_id, run_name=name, tags={"stage": "train"}, start_time=START_MS
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    # What the train stage logs; evaluate adds the rest (not to the run "not evaluated").
    metrics = {"train_loss": 2.0, "val_loss": 2.0}
    if val_loss is not None:
        metrics = {
            "train_loss": val_loss - 0.1,
            "val_loss": val_loss,
            "val_bits_per_char": val_loss / math.log(2),
            "uniform_loss": math.log(65),
        }
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status, end_time=START_MS + round(seconds * 1000))
    return run.info.run_id


def test_the_leaderboard_ranks_every_evaluated_training_run_by_val_loss(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    bigrams, ladder = client.create_experiment("bigram"), client.create_experiment("ladder")
    training_run(client, bigrams, "main@1234567", BIGRAM | MINIBATCH, 2.4865, 4.5)
    baby = training_run(client, ladder, "baby-gpt", BABY_GPT, 1.7262, 389)
    # Trained in two processes (torchrun): its batch is theirs.
    training_run(client, ladder, "small-gpt", SMALL_GPT | {"train.processes": "2"}, 1.9679, 180)
    training_run(client, ladder, "counts", BIGRAM | {"train.method": "counts"}, 2.4519, 3)
    training_run(client, ladder, "killed", SMALL_GPT, 1.5, 60, RunStatus.to_string(4))
    training_run(client, ladder, "not evaluated", SMALL_GPT, None, 60)
    other = client.create_run(ladder, run_name="evaluate of baby-gpt", tags={"stage": "evaluate"})
    client.log_metric(other.info.run_id, "val_loss", 1.0)
    # Logged by hand, without the pipeline's params: no row.
    foreign = client.create_run(ladder, run_name="by hand", tags={"stage": "train"})
    for key, value in {"val_loss": 1.0, "train_loss": 1.0, "val_bits_per_char": 1.4}.items():
        client.log_metric(foreign.info.run_id, key, value)
    client.log_metric(foreign.info.run_id, "uniform_loss", math.log(65))
    client.set_terminated(foreign.info.run_id)

    output = tmp_path / "leaderboard.md"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.leaderboard", "--output", str(output)],
        cwd=REPO_ROOT,
        env={"MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert output.read_text() == result.stdout
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["#", "run", "model", "parameters"] and "val loss" in header
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[1] for row in rows] == ["baby-gpt", "small-gpt", "counts", "main@1234567"]
    first = dict(zip(header, rows[0], strict=True))
    assert first["model"] == "gpt 4L 4H 128E dropout 0.2"
    assert first["parameters"] == "816,705"  # nanoGPT's baby GPT at V = 65, as docs/LADDER.md
    assert first["lr"] == "0.001 cosine" and first["batch x block"] == "12 x 64"
    assert first["val loss"] == "**1.7262**" and first["training wall"] == "6 min 29 s"
    assert first["run page"] == (
        f"[open](http://127.0.0.1:5000/#/experiments/{ladder}/runs/{baby}"
        "?workflowType=machine_learning)"
    )
    small = dict(zip(header, rows[1], strict=True))
    assert small["model"] == "gpt 3L 4H 32E" and small["parameters"] == "42,369"
    assert small["batch x block"] == "2 x 32 x 8"
    counts = dict(zip(header, rows[2], strict=True))
    assert counts["lr"] == "L-BFGS" and counts["batch x block"] == "all"
    bigram = dict(zip(header, rows[3], strict=True))
    assert bigram["parameters"] == "4,225" and bigram["training wall"] == "4.5 s"


def leaderboard(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.leaderboard", *args],
        cwd=REPO_ROOT,
        env={"MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_into_replaces_the_table_of_a_page_between_its_markers(tmp_path):
    """`make ladder` writes the table of docs/LADDER.md so; the page keeps the rest, and its table
    has no run-page links (its readers do not have the store they open)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    ladder = client.create_experiment("ladder")
    training_run(client, ladder, "small-gpt", SMALL_GPT, 1.9679, 180)
    training_run(client, ladder, "bigram", BIGRAM | MINIBATCH, 2.4865, 4.5)
    page = tmp_path / "LADDER.md"
    page.write_text(
        "# Ladder\n\n<!-- leaderboard -->\n| old | table |\n<!-- /leaderboard -->\nAfter.\n"
    )

    result = leaderboard(uri, "--into", str(page))

    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert text.startswith("# Ladder\n\n<!-- leaderboard -->\n| # | run | model |")
    assert text.endswith("|\n<!-- /leaderboard -->\nAfter.\n")
    table = text.split("<!-- leaderboard -->\n")[1].split("<!-- /leaderboard -->")[0]
    lines = table.splitlines()
    assert len(lines) == 4 and "old" not in table and "open" not in table
    assert "run page" not in lines[0] and lines[0].endswith("| training wall |")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["small-gpt", "bigram"]
    # The printed table keeps its links.
    assert "[open](http://127.0.0.1:5000/" in result.stdout


def test_into_a_page_without_markers_names_them_and_leaves_it_untouched(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    training_run(client, client.create_experiment("ladder"), "bigram", BIGRAM, 2.4865, 4.5)
    page = tmp_path / "LADDER.md"
    page.write_text("# Ladder\n| a hand-made table |\n")

    result = leaderboard(uri, "--into", str(page))

    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: {page} has no lines <!-- leaderboard --> and <!-- /leaderboard -->: put them "
        "around the table that --into replaces"
    )
    assert page.read_text() == "# Ladder\n| a hand-made table |\n"


def test_an_empty_store_says_what_to_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.leaderboard"],
        cwd=REPO_ROOT,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == "no evaluated training run in the store yet: run `dvc repro` first\n"
