"""The MLflow runs of the stages: runs that always end, found again by what they made.

Every stage logs into a run that ends FINISHED, FAILED or KILLED (``stage_run``); evaluate,
register and sample log into child runs of the training run, and evaluate and sample add their
results to it without resuming it (``model_run``, ``add_to_run``). Later stages find the run
that made their input by the input's sha256, tagged on the run (``find_run``), so no run id
enters a file DVC hashes. Where the store
is and how it is opened is pipeline.store's business.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, RunInputs, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline import git
from pipeline.errors import PipelineError, StageInterrupted
from pipeline.files import file_sha256
from pipeline.params import Params
from pipeline.paths import MANIFEST_PATH, TRAIN_TOKENS_PATH, VAL_TOKENS_PATH
from pipeline.secrets import masked
from pipeline.store import (
    HOST_TAG,
    PID_TAG,
    PROCESS_TAG,
    connect,
    first_line,
    process_tags,
    run_process_has_gone,
    tracking_uri,
)

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
# data.name of the committed params.yaml: a training run names its corpus only when it differs.
DEFAULT_CORPUS = "shakespeare"


def dvc_experiment_name() -> str | None:
    """The experiment's name when the stage runs under `dvc exp run`, else None."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_name(params: Params) -> str:
    """The training run's name: the DVC experiment's, or ``<branch>@<short commit>``, then the
    corpus in parentheses unless it is the default one: ``main@20dfdea (lunyu)``.

    Without the corpus, a training on a user's own text and the Shakespeare training of the
    same commit would carry the same name in MLflow's runs table.
    """
    name = dvc_experiment_name() or git.code_version()
    if params.data.name != DEFAULT_CORPUS:
        name = f"{name} ({params.data.name})"
    return name


def corpus_run_name(stage: str, params: Params) -> str:
    """The name of a download or vocab run: the stage and the corpus, ``download lunyu``."""
    return f"{stage} {params.data.name}"


def end_runs_of_dead_processes(experiment_id: str) -> None:
    """End KILLED the runs that stages on this machine left RUNNING when they died unhandled,
    and mark FAILED the models they were logging.

    SIGKILL, the out-of-memory killer or a power cut give a stage no chance to end its run;
    the next stage finds such runs by the host, process id and process identity tagged on them
    (store.run_process_has_gone: a live run of another container of the same host name stays).
    """
    client = MlflowClient()
    host = socket.gethostname()
    left_running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
    )
    for run in left_running:
        tags = run.data.tags
        if run_process_has_gone(tags.get(PID_TAG, ""), tags.get(PROCESS_TAG)):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            # A model the killed stage was logging would stay PENDING for ever.
            remove_unfinished_models(experiment_id, run.info.run_id)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run that ends FINISHED, FAILED or KILLED.

    Ctrl-C, SIGTERM and SIGHUP end it KILLED, any other error FAILED: no run is left RUNNING.
    A stage only ever ends the run it started here.
    """
    experiment_id = connect(params.tracking.experiment_name)
    end_runs_of_dead_processes(experiment_id)
    all_tags = {
        "stage": stage,
        "mlflow.source.git.commit": git.head_commit() or "unknown",
        **(tags or {}),
    }
    experiment_name = dvc_experiment_name()
    if experiment_name:
        all_tags["dvc.exp_name"] = experiment_name
    try:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            parent_run_id=parent_run_id,
            tags={**all_tags, **process_tags()},
        )
    except MlflowException as error:
        raise PipelineError(f"cannot start the MLflow {stage} run: {first_line(error)}") from None
    try:
        yield run
    except (KeyboardInterrupt, StageInterrupted):
        remove_unfinished_models(run.info.experiment_id, run.info.run_id)
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        remove_unfinished_models(run.info.experiment_id, run.info.run_id)
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def active_run() -> mlflow.ActiveRun:
    """The run the stage started (stage_run): logging outside one is a bug of ours."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: log inside tracking.stage_run")
    return run


def find_run(experiment_id: str, stage: str, tag: str, value: str) -> str | None:
    """The id of the latest FINISHED run of a stage tagged ``tag = value``, or None."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.stage = '{stage}' and tags.`{tag}` = '{value}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_exists(run_id: str) -> bool:
    """Whether the store holds the run, not deleted (a store replaced or wiped no longer does)."""
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


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


def remove_unfinished_models(experiment_id: str, run_id: str) -> None:
    """Delete what a failed run left of models it was logging, and mark them FAILED.

    A full disk or Ctrl-C while MLflow copies a model into the artifact store leaves a partial
    model directory there. Best effort: the stage is failing already, and its own error is the
    one to show.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient()
    try:
        models = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
    except Exception:
        return
    for model in models:
        if model.status == LoggedModelStatus.READY:
            continue
        with contextlib.suppress(Exception):
            get_artifact_repository(model.artifact_location).delete_artifacts()
            if model.artifact_location.startswith("file:"):
                # The model's own directory (models/<id>), now empty.
                local = Path(
                    urllib.parse.unquote(urllib.parse.urlsplit(model.artifact_location).path)
                )
                local.parent.rmdir()
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


@contextlib.contextmanager
def model_run(
    stage: str, params: Params, training_run: str, stage_params: dict[str, Any]
) -> Iterator[mlflow.ActiveRun]:
    """A downstream stage (evaluate, sample) logs into its own child run of the training run.

    The training run is never resumed, so its status stays the one training gave it; this
    stage's failure or interruption shows on the child run alone.
    """
    name = f"{stage} of {run_name(params)}"
    with stage_run(stage, params, parent_run_id=training_run, run_name=name) as run:
        if stage_params:
            mlflow.log_params(stage_params)
        yield run


def add_to_run(
    run_id: str,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    artifacts: tuple[Path, ...] = (),
    texts: dict[str, str] | None = None,
) -> None:
    """Add metrics and artifacts to a finished run without resuming it: its status stays."""
    client = MlflowClient()
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], synchronous=True
        )
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    for artifact_file, text in (texts or {}).items():
        client.log_text(run_id, text, artifact_file)


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
    # params go on the register and sample stages' runs.
    mlflow.log_params(params.flat("data", "train"))
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


def log_losses(point: dict, datasets: dict[str, MetaDataset]) -> None:
    """Log one point of the loss curve into the active run, each loss linked to its split.

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
