"""What a run consumed and made: datasets, the sha256 tags runs are found by, the loss curve.

Later stages find the run that made their input by the input's sha256, tagged on the run
(``MODEL_TAG``, ``MANIFEST_TAG``, ``CORPUS_TAG``; ``training_run_id``), so no run id enters a file
DVC hashes. Training links the corpus and its splits as MLflow datasets, and logs each eval
point's losses against them, on the run (``log_losses``) and on the logged model
(``log_model_losses``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, RunInputs
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.errors import PipelineError
from pipeline.files import file_sha256
from pipeline.params import Params
from pipeline.paths import MANIFEST_PATH, TRAIN_TOKENS_PATH, VAL_TOKENS_PATH
from pipeline.secrets import masked
from pipeline.tracking.runs import active_run, find_run
from pipeline.tracking.store import connect, tracking_uri

if TYPE_CHECKING:
    from mlflow.data.meta_dataset import MetaDataset


DATASET_LOG_ATTEMPTS = 3
# How a later stage finds the run that made its input: by the input's sha256, tagged on the run.
# No run id enters a DVC-tracked file, so outputs stay byte-identical from run to run.
MODEL_TAG = "model_sha256"
MANIFEST_TAG = "manifest_sha256"
CORPUS_TAG = "corpus_sha256"
# On each registered version, with MODEL_TAG: the training run of its weights, and the sha256
# of the sampling defaults it serves with (data/register/sampling_defaults.json).
TRAINING_RUN_TAG = "training_run_id"
SAMPLING_DEFAULTS_TAG = "sampling_defaults_sha256"


def training_datasets(params: Params, corpus_sha256: str) -> dict[str, MetaDataset]:
    """The corpus and its train and val splits as MLflow datasets (digest: their sha256)."""
    # Imported here: only training links datasets, and other stages need not load them.
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = HTTPDatasetSource(masked(params.data.url))
    name = params.data.name

    def dataset(name: str, digest: str) -> MetaDataset:
        # MLflow's stubs leave MetaDataset's profile abstract; the class is meant to be made.
        return MetaDataset(source, name=name, digest=digest[:16])  # type: ignore[abstract]

    return {
        "corpus": dataset(name, corpus_sha256),
        "train": dataset(f"{name}-train", file_sha256(TRAIN_TOKENS_PATH)),
        "val": dataset(f"{name}-val", file_sha256(VAL_TOKENS_PATH)),
    }


def log_training_inputs(
    params: Params, corpus_sha256: str, tags: dict[str, str], datasets: dict[str, MetaDataset]
) -> None:
    """Params, tags, lineage and datasets of the active training run, so that a model can be
    traced to its data and code."""
    # The params training reads, named as DVC names them (`train.lr`, `data.name`); the sample
    # params go on the register and sample stages' runs. A bigram has no sizes: its runs show
    # model.type alone, so that the runs table holds no GPT size that no model of the row has.
    model = params.flat("model") if params.model.type != "bigram" else {"model.type": "bigram"}
    mlflow.log_params({**params.flat("data"), **model, **params.flat("train")})
    run = active_run()
    experiment_id = run.info.experiment_id
    lineage = {
        "download_run_id": find_run(experiment_id, "download", CORPUS_TAG, corpus_sha256),
        "vocab_run_id": find_run(experiment_id, "vocab", MANIFEST_TAG, file_sha256(MANIFEST_PATH)),
    }
    mlflow.set_tags(
        {
            **tags,
            CORPUS_TAG: corpus_sha256,
            **{name: run_id for name, run_id in lineage.items() if run_id},
        }
    )
    log_datasets(
        run.info.run_id,
        {"training": datasets["corpus"], "train": datasets["train"], "validation": datasets["val"]},
    )


def log_losses(point: dict, datasets: dict[str, MetaDataset], model_id: str | None = None) -> None:
    """Log one point of the loss curve into the active run, each loss linked to its split, and
    to the logged model of that step when given (a checkpoint: its page then shows them).

    One write for both losses: mlflow.log_metric makes several store round trips per metric
    (~9 ms a metric on SQLite, 1.8 s for the 101 eval points of 30,000 steps). The splits are
    linked to the run already (log_training_inputs).
    """
    now = int(time.time() * 1000)
    losses = [
        Metric(
            f"{split}_loss",
            point[f"{split}_loss"],
            now,
            point["step"],
            dataset_name=datasets[split].name,
            dataset_digest=datasets[split].digest,
            model_id=model_id,
        )
        for split in ("train", "val")
    ]
    MlflowClient().log_batch(active_run().info.run_id, metrics=losses, synchronous=True)


def log_datasets(run_id: str, datasets_by_context: dict[str, Any]) -> None:
    """Link datasets to a run, each under its context ("training", "validation", ...).

    MLflow creates a dataset row on first use with a look-up then an insert, so two queue
    workers logging the same corpus at once can both miss it and one insert then fails on the
    store's unique key. All links go in one call (one transaction, rolled back on failure), so
    retrying finds the row the other worker committed and only adds the links.
    """
    inputs = [
        DatasetInput(
            dataset=dataset._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
        )
        for context, dataset in datasets_by_context.items()
    ]
    for attempt in range(DATASET_LOG_ATTEMPTS):
        try:
            MlflowClient().log_inputs(run_id, datasets=inputs)
            return
        except MlflowException:
            if attempt == DATASET_LOG_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_model_losses(
    run_id: str, losses: dict[str, float], step: int, model_ids: list[str]
) -> None:
    """Log the train and val loss into the active run at ``step`` for each logged model, each
    linked to its split's dataset as the training run ``run_id`` links them
    (log_training_inputs): the models' pages show the final losses with their datasets.

    MLflow links a run's metrics to a model it logs, but without their datasets, so the losses
    are logged after the models, with both."""
    client = MlflowClient()
    by_context = {
        tag.value: found.dataset
        for found in (client.get_run(run_id).inputs or RunInputs([])).dataset_inputs
        for tag in found.tags
        if tag.key == MLFLOW_DATASET_CONTEXT
    }
    now = int(time.time() * 1000)
    metrics = []
    for model_id in model_ids:
        for name, context in (("train_loss", "train"), ("val_loss", "validation")):
            dataset = by_context.get(context)
            metrics.append(
                Metric(
                    name,
                    losses[name],
                    now,
                    step,
                    model_id=model_id,
                    dataset_name=None if dataset is None else dataset.name,
                    dataset_digest=None if dataset is None else dataset.digest,
                )
            )
    client.log_batch(active_run().info.run_id, metrics=metrics, synchronous=True)


def last_step(run_id: str, metric: str) -> int:
    """The last step at which a run logged a metric (0 if never)."""
    history = MlflowClient().get_metric_history(run_id, metric)
    return max((entry.step for entry in history), default=0)


def training_run_id(params: Params, model_sha256: str) -> str:
    """The training run that made a model file: the latest FINISHED one tagged with its sha256."""
    experiment_id = connect(params.tracking.experiment_name)
    run_id = find_run(experiment_id, "train", MODEL_TAG, model_sha256)
    if run_id is None:
        raise PipelineError(
            f"no finished training run in the MLflow store {masked(tracking_uri())} holds "
            f"data/train/model.pt (tag {MODEL_TAG} = {model_sha256[:12]}...): rerun training "
            "with `dvc repro -f train`"
        )
    return run_id
