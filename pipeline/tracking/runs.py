"""The MLflow runs of the stages: runs that always end, and the one reaper of abandoned ones.

Every stage logs into a run that ends FINISHED, FAILED or KILLED (``stage_run``); evaluate,
register and sample log into child runs of the training run, and evaluate and sample add their
results to it without resuming it (``model_run``, ``add_to_run``). A run a killed stage left
RUNNING is ended KILLED by the next stage (``end_runs_of_dead_processes``). Where the store is and
how it is opened is tracking.store's business; what a run consumed and made is tracking.lineage's.
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
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException

from pipeline import git
from pipeline.errors import PipelineError, StageInterrupted
from pipeline.params import Params
from pipeline.tracking.processes import (
    HOST_TAG,
    PID_TAG,
    PROCESS_TAG,
    process_tags,
    run_process_has_gone,
)
from pipeline.tracking.store import connect, first_line

if TYPE_CHECKING:
    pass


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
