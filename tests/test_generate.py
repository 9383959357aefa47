"""The generate command: any saved form of a model, one text for one seed, clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import generate, paths
from pipeline.errors import PipelineError
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.sampling import write_sampling_defaults
from pipeline.params import load_params
from pipeline.tracking import registry, runs
from testbed import REPO_ROOT
from tests.support.models import CHARS


def generated(capsys, *args: str) -> str:
    generate.main(list(args))
    return capsys.readouterr().out.removesuffix("\n")


def test_generate_continues_the_prompt(workspace, capsys):
    text = generated(capsys, "--prompt", "ROMEO:", "--chars", "300", "--seed", "5")
    assert text.startswith("ROMEO:") and len(text) == 306 and set(text) <= set(CHARS)
    assert generated(capsys, "--prompt", "ROMEO:", "--chars", "300", "--seed", "5") == text
    assert generated(capsys, "--prompt", "ROMEO:", "--chars", "300", "--seed", "6") != text


def test_generating_zero_characters_returns_the_prompt(workspace, capsys):
    assert generated(capsys, "--prompt", "JULIET:", "--chars", "0") == "JULIET:"


def test_requests_are_bounded_by_sample_max_chars(workspace, capsys):
    assert len(generated(capsys, "--chars", "500")) == 500  # sample.max_chars in the workspace
    with pytest.raises(PipelineError, match=r"501 characters .* sample.max_chars = 500"):
        generate.main(["--chars", "501"])


def test_prompt_characters_outside_the_vocabulary_fail_with_one_line(workspace):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.generate", "--prompt", "ROMEO@é: zz", "--chars", "5"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: prompt has characters outside the model's vocabulary of "
        f"{len(CHARS)}: '@', 'z', 'é'; remove or replace them"
    ]


def test_missing_model_is_named(workspace):
    with pytest.raises(PipelineError, match="no model at nowhere/model.pt"):
        generate.main(["--model", "nowhere/model.pt"])


def test_every_form_of_a_logged_model_generates_the_same_text(workspace, capsys):
    """The registered pyfunc, the run's PyTorch model, an MLflow model directory and the
    model.pt all hold the same weights and vocabulary, so one seed gives one text."""
    params = load_params()
    model = BigramLanguageModel(len(CHARS))
    model.load_state_dict(torch.load(paths.MODEL_PATH, weights_only=True))
    with runs.stage_run("train", params) as run:
        defaults = write_sampling_defaults(params.sample, Path.cwd())
        metrics = {"train_loss": 3.0, "val_loss": 3.0}
        registry.log_and_register(model, defaults, params, run.info.run_id, metrics, 0, {})
    run_id = run.info.run_id
    local_dir = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/generator", dst_path="dl")

    request = ["--prompt", "ROMEO:", "--chars", "200", "--seed", "3"]
    texts = {
        reference: generated(capsys, "--model", reference, *request)
        for reference in (
            str(paths.MODEL_PATH),
            f"runs:/{run_id}/model",
            f"runs:/{run_id}/generator",
            "models:/bigram-shakespeare/latest",
            "models:/bigram-shakespeare/1",
            local_dir,
        )
    }
    assert len(set(texts.values())) == 1, texts
    assert next(iter(texts.values())).startswith("ROMEO:")

    with pytest.raises(PipelineError, match="cannot load model models:/nope/1 from the MLflow"):
        generate.main(["--model", "models:/nope/1"])
