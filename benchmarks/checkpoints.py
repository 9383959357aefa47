"""Target 13: what a checkpoint costs at each CPU step of the ladder, and how long a resume takes.

Per eval point, the train stage writes the checkpoint file (pipeline.lm.checkpoints) and logs its
weights as a logged model into a real SQLite MLflow store (pipeline.tracking.checkpoints); both
are timed here against the training they interrupt, one eval interval of the step's own loop. A
resume loads the file back into a fresh model and TrainingState.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import mlflow
import torch

from benchmarks.gpt import LADDER, LadderStep, no_progress
from benchmarks.measure import Row, fmt_seconds, interleaved_medians
from benchmarks.workload import Workload
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.checkpoints import Best, load_checkpoint, save_checkpoint
from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.models import LanguageModel
from pipeline.lm.training import TrainingState, new_training_state, train_minibatch
from pipeline.tracking.checkpoints import log_checkpoint

MAX_CHECKPOINT_SHARE = 0.05  # of an eval interval's training, for the GPTs
# What log_losses reads of a dataset: its name and digest.
DATASETS = {
    split: types.SimpleNamespace(name=f"shakespeare-{split}", digest="0" * 8)
    for split in ("train", "val")
}


def checkpoint_rows(work: Workload, scratch: Path, repeats: int) -> list[Row]:
    mlflow.set_tracking_uri(f"sqlite:///{scratch / 'checkpoints-mlflow.db'}")
    experiment_id = mlflow.MlflowClient().create_experiment("checkpoints")
    rows = []
    with mlflow.start_run(experiment_id=experiment_id):
        for step in LADDER:
            rows += _step_rows(work, step, scratch / f"{step.name}.pt", repeats)
    return rows


def _new_model(work: Workload, step: LadderStep) -> LanguageModel:
    config = step.gpt_config(work.vocab_size)
    torch.manual_seed(0)
    return BigramLanguageModel(work.vocab_size) if config is None else GPTLanguageModel(config)


def _step_rows(work: Workload, step: LadderStep, path: Path, repeats: int) -> list[Row]:
    config = step.train_params()
    interval = dataclasses.replace(config, max_iters=config.eval_interval)
    model = _new_model(work, step)
    state = new_training_state(model, interval, torch.device("cpu"))
    best = Best()
    best.update(0, 2.5, model)
    curve = [{"step": s, "train_loss": 2.5, "val_loss": 2.5} for s in range(0, 5000, 250)]
    points = iter(range(1, 10**9))

    def train_interval() -> None:
        state.step = 0
        train_minibatch(
            model, work.train_tokens, interval, lambda _: None, no_progress(), state=state
        )

    def write_file() -> None:
        save_checkpoint(path, "id", "run", model, state, curve, best)

    def log_model() -> None:
        log_checkpoint(model, {"step": next(points), "train_loss": 2.5, "val_loss": 2.5}, DATASETS)

    def resume() -> None:
        checkpoint = load_checkpoint(path, "id")
        assert checkpoint is not None
        fresh = _new_model(work, step)
        fresh.load_state_dict(checkpoint.model)
        new_state: TrainingState = new_training_state(fresh, interval, torch.device("cpu"))
        new_state.load_state_dict(checkpoint.training)

    train_interval()  # The optimizer's state exists from the first step on, as in a run.
    write_file()
    medians = interleaved_medians(
        {"train": train_interval, "file": write_file, "log": log_model, "resume": resume},
        repeats,
    )
    checkpoint_s = medians["file"] + medians["log"]
    share = checkpoint_s / medians["train"]
    is_gpt = step.gpt_config(work.vocab_size) is not None
    size_mb = path.stat().st_size / 1e6
    return [
        Row(
            "13 checkpoints",
            f"{step.name}: a checkpoint ({size_mb:.1f} MB file + a logged model on SQLite) vs "
            f"the {config.eval_interval} steps of training between two",
            fmt_seconds(medians["train"]),
            f"{fmt_seconds(medians['file'])} + {fmt_seconds(medians['log'])}",
            f"{share:.1%}",
            f"<= {MAX_CHECKPOINT_SHARE:.0%}" if is_gpt else "",
            share <= MAX_CHECKPOINT_SHARE if is_gpt else None,
        ),
        Row(
            "13 checkpoints",
            f"{step.name}: a resume (load the file into a new model and training state)",
            "",
            fmt_seconds(medians["resume"]),
        ),
    ]
