"""A model source is data, never code: the generate command reads only tensors and JSON from a
logged model, a model directory or a model.pt, reads nothing outside the model's directory,
leaves no download behind and stops quietly when its reader does; the served model bounds the
rows of a request.

The crafted models are the real ones the train stage logs, with a file replaced by a pickle
whose unpickling creates a marker file, or by code that does.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from pipeline import generate, paths
from pipeline.errors import PipelineError
from pipeline.lm import sampling
from testbed import REPO_ROOT, assert_one_line_error, update_params
from tests.support.models import CHARS, log_generator, model_temp_dirs


class CreatesFile:
    """Unpickled, opens a file for writing, creating it: what a crafted pickle does with any
    code. Its pickle names only io.open, so any process can unpickle it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def generate_command(workspace: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.generate", *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(workspace), **env},
        timeout=120,
    )


def downloaded(run_id: str, artifact: str, destination: Path) -> Path:
    """A logged model of the run as an MLflow model directory of its own."""
    destination.mkdir()
    return Path(
        mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{artifact}", dst_path=str(destination))
    )


def assert_loads(model_dir: Path) -> None:
    """The model as logged generates: what a crafted copy refuses is the crafted part."""
    text = generate.load_generator(str(model_dir), paths.VOCAB_PATH).generate("A", 20, 1.0, 0)
    assert len(text) == 21


# Untrusted model files run no code ---------------------------------------------------------


def test_a_crafted_pickle_in_a_logged_pytorch_model_is_refused_without_running_it(
    workspace, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(workspace / "tmp"))
    (workspace / "tmp").mkdir()
    marker = workspace / "pickle-ran"
    run_id = log_generator(workspace)
    model_dir = downloaded(run_id, "model", workspace / "copy")
    assert_loads(model_dir)

    torch.save(CreatesFile(marker), model_dir / "data/model.pth")
    result = generate_command(workspace, "--model", str(model_dir), "--chars", "5")
    assert_one_line_error(result, "model.pth is refused", "io.open", "could run code")
    assert not marker.exists()

    # The same model fetched from the store by its URI, into a directory that goes again.
    for stored in workspace.glob("mlartifacts/**/data/model.pth"):
        torch.save(CreatesFile(marker), stored)
    with pytest.raises(PipelineError, match="model.pth is refused"):
        generate.main(["--model", f"runs:/{run_id}/model", "--chars", "5"])
    assert not marker.exists()
    assert model_temp_dirs() == []


def test_a_logged_generator_runs_none_of_its_code_or_pickles(workspace):
    """The pyfunc generator is rebuilt from its weights, vocabulary and defaults: its
    served_model_entry.py and code/ are never run, and its weights are read as tensors only."""
    marker = workspace / "code-ran"
    run_id = log_generator(workspace)
    model_dir = downloaded(run_id, "generator", workspace / "copy")
    for code in [model_dir / "served_model_entry.py", *model_dir.glob("code/pipeline/*.py")]:
        code.write_text(f"open({str(marker)!r}, 'w')\n")
    assert_loads(model_dir)
    assert not marker.exists()

    torch.save(CreatesFile(marker), model_dir / "artifacts/model.pt")
    result = generate_command(workspace, "--model", str(model_dir), "--chars", "5")
    assert_one_line_error(result, "model.pt is refused", "io.open")
    assert not marker.exists()


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_an_mlmodel_naming_a_file_outside_the_model_is_refused(workspace, tmp_path, escape):
    """extra_files (and a link among them) must not make the command read other files, even
    one that would load: a vocabulary beside the model."""
    run_id = log_generator(workspace)
    model_dir = downloaded(run_id, "model", workspace / "copy")
    assert_loads(model_dir)
    outside = tmp_path / "outside" / "vocab.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps({"chars": CHARS}))
    mlmodel_path = model_dir / "MLmodel"
    mlmodel = yaml.safe_load(mlmodel_path.read_text())
    extra_files = mlmodel["flavors"]["pytorch"]["extra_files"]
    (vocab_entry,) = [entry for entry in extra_files if entry["path"].endswith("vocab.json")]
    if escape == "symlink":
        named = vocab_entry["path"]
        (model_dir / named).unlink()
        (model_dir / named).symlink_to(outside)
    else:
        named = str(outside) if escape == "absolute" else os.path.relpath(outside, model_dir)
        assert (model_dir / named).resolve() == outside
        vocab_entry["path"] = named
        mlmodel_path.write_text(yaml.safe_dump(mlmodel))

    with pytest.raises(PipelineError) as raised:
        generate.main(["--model", str(model_dir), "--chars", "5"])
    message = str(raised.value)
    assert f"its MLmodel names {named!r}, outside the model's directory" in message
    assert "\n" not in message


@pytest.mark.parametrize("pickled_by", ["torch.save", "pickle.dump"])
def test_a_pickle_model_pt_is_refused_in_one_line_without_a_warning(workspace, pickled_by):
    """data/train/model.pt is read by the load every model.pt goes through (generate, evaluate,
    sample, the served model); a plain pickle also drew a torch warning."""
    marker = workspace / "pickle-ran"
    crafted = CreatesFile(marker)
    if pickled_by == "torch.save":
        torch.save(crafted, paths.MODEL_PATH)
    else:
        paths.MODEL_PATH.write_bytes(pickle.dumps(crafted, protocol=4))
    result = generate_command(workspace, "--chars", "5")
    assert_one_line_error(result, f"{paths.MODEL_PATH} is refused", "could run code")
    assert not marker.exists()


# Tracebacks that remain --------------------------------------------------------------------


def test_output_into_a_pipe_its_reader_closed_ends_quietly(workspace):
    """`generate | head -c 10`: 300,000 characters outgrow the pipe's buffer, so the command
    writes after head has gone; it exits as a closed pipe ends `yes`, 141, saying nothing."""
    update_params(workspace, sample={"max_chars": 1_000_000})
    command = f"set -o pipefail; {sys.executable} -m pipeline.generate --chars 300000 | head -c 10"
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=workspace,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(workspace)},
        timeout=120,
    )
    assert len(result.stdout) == 10
    assert result.stderr == ""
    assert result.returncode == generate.EXIT_BROKEN_PIPE == 141


def test_a_bad_model_source_leaves_no_temporary_directory(workspace, tmp_path):
    """file:///proc/self/ used to be copied (its files, while MLflow's threads went on writing)
    into a bigram-model-* directory that then could not be removed."""
    log_generator(workspace)  # A store, where the URI used to be looked up.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = generate_command(workspace, "--model", "file:///proc/self/", TMPDIR=str(scratch))
    assert list(scratch.iterdir()) == []
    assert_one_line_error(result, "no model at file:///proc/self/")

    # A file: URI is read in place, not copied.
    model_uri = (workspace / paths.MODEL_PATH).as_uri()
    result = generate_command(workspace, "--model", model_uri, "--chars", "5", TMPDIR=str(scratch))
    assert result.returncode == 0 and len(result.stdout) == 6, result.stderr
    assert list(scratch.iterdir()) == []


# Serving cost ------------------------------------------------------------------------------


def test_the_rows_and_prompts_of_a_request_are_bounded_and_answered_in_seconds(workspace):
    """Through the logged pyfunc's predict: 100,000 rows of 10 characters (within max_chars)
    took 57 s; now a request over the row bound is refused at once, and one at it answers."""
    update_params(workspace, sample={"max_chars": 1_000_000})
    run_id = log_generator(workspace)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator")

    def predict(rows: int, prompt: str = "A", chars: int = 10) -> tuple[list[str], float]:
        started = time.perf_counter()
        texts = model.predict(pd.DataFrame({"prompt": [prompt] * rows, "chars": [chars] * rows}))
        return texts, time.perf_counter() - started

    with pytest.raises(MlflowException) as raised:
        predict(100_000)
    assert str(raised.value).splitlines() == [
        "100,000 rows in one request, above the limit of 1,000 rows "
        "(pipeline.lm.sampling.MAX_REQUEST_ROWS); split the request"
    ]
    with pytest.raises(MlflowException, match=r"pipeline.lm.sampling.MAX_PROMPT_CHARS"):
        predict(2, prompt="A" * (sampling.MAX_PROMPT_CHARS // 2 + 1))

    texts, took_s = predict(sampling.MAX_REQUEST_ROWS)
    assert len(texts) == sampling.MAX_REQUEST_ROWS and {len(text) for text in texts} == {11}
    assert took_s < 30, f"{took_s:.1f} s for a request within the limits"
