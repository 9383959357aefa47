"""A tiny model and vocabulary in a project directory, as the train stage leaves them, and that
model logged as the pipeline's generator."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline import paths
from pipeline.files import write_json
from pipeline.lm import sampling
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.params import load_params
from pipeline.tracking import registry, runs
from testbed import update_params, write_committed_params

CHARS = list("\n !',.:;?ABCDEIJLMNORTUaehilmnorstuy")


def make_workspace(directory: Path) -> Path:
    """params.yaml (sample.max_chars 500), a vocabulary of CHARS and a model.pt in directory."""
    write_committed_params(directory)
    update_params(directory, sample={"max_chars": 500})
    write_json(directory / paths.VOCAB_PATH, {"chars": CHARS})
    torch.manual_seed(0)
    model = BigramLanguageModel(len(CHARS))
    (directory / paths.MODEL_PATH).parent.mkdir(parents=True)
    torch.save(model.state_dict(), directory / paths.MODEL_PATH)
    return directory


def log_generator(workspace: Path) -> str:
    """Log the workspace's model.pt as the pipeline's pyfunc generator; return its run id.

    Its default request is 100 characters, and sample.max_chars 500 bounds a whole request.
    """
    update_params(workspace, sample={"num_chars": 100})
    params = load_params()
    model = BigramLanguageModel(len(CHARS))
    model.load_state_dict(torch.load(paths.MODEL_PATH, weights_only=True))
    with runs.stage_run("train", params) as run:
        defaults = sampling.write_sampling_defaults(params.sample, Path.cwd())
        metrics = {"train_loss": 3.0, "val_loss": 3.0}
        registry.log_and_register(model, defaults, params, run.info.run_id, metrics, 0, {})
    return run.info.run_id


def model_temp_dirs() -> list[str]:
    """The temporary directories model loads leave in the system's temporary directory."""
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("bigram-model-*"))
