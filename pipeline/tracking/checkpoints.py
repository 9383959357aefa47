"""A training run's checkpoints as MLflow logged models, and the tags of a resumed run.

Each checkpoint's weights (model.pt, as the train stage would write it at that step) are a
logged model of the training run, at its step and with that eval point's losses, so MLflow's
Logged Models page lists a run's checkpoints with their losses; ``model_type`` "checkpoint" tells
them from the register stage's models. The full state a run resumes from stays in the
checkpoint file (pipeline.lm.checkpoints): an optimizer's state is no model to compare.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelOutput, LoggedModelStatus

from pipeline.lm.models import LanguageModel, save_model
from pipeline.paths import MODEL_PATH
from pipeline.tracking.lineage import log_losses
from pipeline.tracking.runs import active_run

CHECKPOINT_MODEL_TYPE = "checkpoint"
RESUMED_FROM_RUN_TAG = "checkpoint.resumed_from_run"
RESUMED_FROM_STEP_TAG = "checkpoint.resumed_from_step"
KEPT_STEP_TAG = "checkpoint.kept_step"


def log_checkpoint(model: LanguageModel, point: dict, datasets: dict[str, MetaDataset]) -> str:
    """Log the weights at an eval point as a logged model of the active run at its step, with
    the point's losses (logged into the run once, linked to the model); returns its id.

    A stage killed half-way leaves the model PENDING, which the next stage marks FAILED
    (runs.end_runs_of_dead_processes).
    """
    run = active_run().info
    step = point["step"]
    logged = mlflow.initialize_logged_model(
        name=f"checkpoint-{step}",
        source_run_id=run.run_id,
        experiment_id=run.experiment_id,
        model_type=CHECKPOINT_MODEL_TYPE,
    )
    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="bigram-checkpoint-") as scratch:
        save_model(model, Path(scratch) / MODEL_PATH.name)
        client.log_model_artifacts(logged.model_id, scratch)
    log_losses(point, datasets, model_id=logged.model_id)
    client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step)])
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def resumed_tags(run_id: str, step: int) -> dict[str, str]:
    """The tags of a run resumed from a checkpoint: which run wrote it, at which step."""
    return {RESUMED_FROM_RUN_TAG: run_id, RESUMED_FROM_STEP_TAG: str(step)}
