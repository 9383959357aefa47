"""The trained model in MLflow: logged in two flavours, registered, given its aliases.

For each trained model the register stage logs ``model`` (PyTorch, for
``mlflow.pytorch.load_model``) and ``generator``: a pyfunc (tracking.served_model) that takes
prompts and returns text, holding the weights and the vocabulary. Both carry the ``sample``
params as their sampling defaults (pipeline.lm.sampling), and the pipeline modules of the
register stage's deps as their code. The generator is registered in the Model Registry under
``tracking.registered_model_name``, one version per new model or new defaults, so that

    mlflow models serve -m models:/bigram-shakespeare@champion --env-manager local

answers ``POST /invocations`` with ``{"dataframe_records": [{"prompt": "ROMEO:", "chars": 200}]}``
by ``{"predictions": ["ROMEO:..."]}``. The columns ``chars``, ``temperature``, ``seed`` and
``top_k`` are optional; their defaults, and the ``max_chars`` bound, are the ``sample`` params.
``max_chars`` bounds the characters of the whole request, all rows together; a request holds at
most ``pipeline.lm.sampling.MAX_REQUEST_ROWS`` rows (1,000) and prompts of ``MAX_PROMPT_CHARS``
characters in all, so that a request within the limits answers in seconds. A bad value in any
row (a prompt that is not a string, ``chars: 1.5``, ``temperature: NaN``) is an HTTP 400 naming it,
before any row is generated.

Loading either flavour through MLflow (``mlflow.pyfunc.load_model``, ``mlflow.pytorch.load_model``,
``mlflow models serve``) runs code the model carries; the generate command reads only its tensors
and JSON files (docs/DESIGN.md, "What a model source is trusted for").

Registry aliases: every new version gets ``challenger``; ``champion`` moves to it only when its
val loss beats the current champion's (the first version becomes champion).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.models import LanguageModel
from pipeline.lm.tokens import load_vocab
from pipeline.params import Params
from pipeline.paths import MODEL_PATH, VOCAB_PATH
from pipeline.tracking import rebuild
from pipeline.tracking.served_model import SIGNATURE, input_example

MODEL_ARTIFACT = "model"
GENERATOR_ARTIFACT = "generator"
CHAMPION = "champion"
CHALLENGER = "challenger"
DVC_EXPERIMENT_TAG = "dvc.exp_name"
# The dvc.yaml stage that runs this module, whose code deps the logged models carry.
REGISTER_STAGE = "register"


@dataclass(frozen=True)
class Registration:
    """The version a training registered, and the aliases it got then."""

    model_name: str
    version: str
    aliases: tuple[str, ...]


def log_and_register(
    model: LanguageModel,
    defaults_path: Path,
    params: Params,
    training_run: str,
    metrics: dict[str, float],
    step: int,
    version_tags: dict[str, str],
) -> tuple[list[str], Registration]:
    """Log both flavours into the active run at ``step`` and register the generator as a new
    version of the training run's model, with ``version_tags`` among its tags; return the two
    logged models' ids and the version.

    MLflow links the active run's metrics logged at ``step`` to the logged models, so they show
    evaluate's metrics when the stage has logged them there. Both models are also outputs of
    the training run, and the version names the training run as its run: the training run's
    page, which users compare and the link stage's summary points at, lists them.
    """
    with model_code() as code_paths:
        pytorch_model_id = log_pytorch_model(model, defaults_path, step, code_paths)
        generator = log_text_generator(MODEL_PATH, VOCAB_PATH, defaults_path, step, code_paths)
    outputs = [
        LoggedModelOutput(model_id, step) for model_id in (pytorch_model_id, generator.model_id)
    ]
    active = mlflow.active_run()
    if active is None or active.info.run_id != training_run:  # Logged into it already.
        mlflow.MlflowClient().log_outputs(training_run, models=outputs)
    registration = register_version(generator.model_id, params, training_run, metrics, version_tags)
    return [output.model_id for output in outputs], registration


@contextlib.contextmanager
def model_code() -> Iterator[list[str]]:
    """The pipeline modules the logged models carry: the register stage's code deps in dvc.yaml.

    The registered model then holds exactly the code that `dvc repro` reruns this stage for, so
    a change to any module it needs makes a new version. Outside a project, the whole package.
    The copy lives in a temporary directory for as long as the models are being logged.
    """
    package = Path(__file__).resolve().parents[1]  # pipeline/, this module's parent package
    if not rebuild.DVC_FILE.is_file():
        yield [str(package)]
        return
    with tempfile.TemporaryDirectory(prefix="bigram-code-") as scratch:
        for dep in rebuild.stage_deps(REGISTER_STAGE):
            path = Path(dep)
            if path.parts[0] == package.name and path.suffix == ".py":
                # The same tree as pipeline/, sub-packages and their __init__.py included.
                (Path(scratch) / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, Path(scratch) / path)
        yield [str(Path(scratch) / package.name)]


def pip_requirements() -> list[str]:
    # Listing requirements skips MLflow's slow inference of them from a subprocess.
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"pandas=={pd.__version__}",
    ]


# MLflow's warning on every PyTorch model it pickles; ours must be (see log_pytorch_model).
PICKLE_WARNING_LOGGER = "mlflow.pytorch"
PICKLE_WARNING_START = "Saving pytorch model by Pickle or CloudPickle format"


class _WithoutPickleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(PICKLE_WARNING_START)


@contextlib.contextmanager
def _pickle_warning_silenced() -> Iterator[None]:
    """Drop MLflow's pickle warning, and only it, while the PyTorch flavour is logged.

    The warning (unpickling may run code; save as 'pt2') is about loading, and loading is where
    this project answers it: the pipeline and the generate command read model files as tensors
    only, and docs/DESIGN.md ("What a model source is trusted for") says which MLflow loaders
    run a model's code. 'pt2' is no choice here (see log_pytorch_model), so a warning on every
    training would only teach users to skip MLflow's warnings.
    """
    logger = logging.getLogger(PICKLE_WARNING_LOGGER)
    only_the_pickle_warning = _WithoutPickleWarning()
    logger.addFilter(only_the_pickle_warning)
    try:
        yield
    finally:
        logger.removeFilter(only_the_pickle_warning)


def log_pytorch_model(
    model: LanguageModel, defaults_path: Path, step: int, code_paths: list[str]
) -> str:
    """Log the model in MLflow's PyTorch format, with its vocabulary; returns its model id."""
    import mlflow.pytorch

    with _pickle_warning_silenced():
        info = mlflow.pytorch.log_model(
            model.cpu(),
            name=MODEL_ARTIFACT,
            # Pickle keeps the full module, so mlflow.pytorch.load_model returns a model that
            # can .generate(); "pt2" would save only the traced forward pass.
            serialization_format="pickle",
            code_paths=code_paths,
            extra_files=[str(VOCAB_PATH), str(defaults_path), *weights_file(model)],
            step=step,
            pip_requirements=pip_requirements(),
        )
    return info.model_id


def weights_file(model: LanguageModel) -> list[str]:
    """A GPT's PyTorch flavour carries model.pt too: the generate command reads only tensors
    from a model, and takes a bigram's table from the pickle (bigram.load_logged_module), but
    will not rebuild a GPT's many modules from one."""
    return [] if isinstance(model, BigramLanguageModel) else [str(MODEL_PATH)]


def log_text_generator(
    weights_path: Path, vocab_path: Path, defaults_path: Path, step: int, code_paths: list[str]
):
    """Log the pyfunc generator into the active run at ``step``; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=GENERATOR_ARTIFACT,
        python_model=str(Path(__file__).resolve().parent / "served_model_entry.py"),
        artifacts={
            "weights": str(weights_path),
            "vocab": str(vocab_path),
            "defaults": str(defaults_path),
        },
        code_paths=code_paths,
        step=step,
        signature=SIGNATURE,
        input_example=input_example(load_vocab(vocab_path)),
        pip_requirements=pip_requirements(),
    )


def register_version(
    model_id: str,
    params: Params,
    training_run: str,
    metrics: dict[str, float],
    version_tags: dict[str, str],
) -> Registration:
    """Register the generator as a new version of the registered model; return it and its aliases.

    The version is tagged with its metrics, ``version_tags`` and every ``model.*`` and
    ``train.*`` param of the training run (named as the run logs them), and described in one
    line. The train params are
    read from the training run, not params.yaml: they are the ones the weights were trained
    with. The registry numbers versions itself: parallel trainings (``dvc queue start -j 4``)
    each get their own version, the SQL store retrying when two claim the same number.
    """
    name = params.tracking.registered_model_name
    client = mlflow.MlflowClient()
    trained = client.get_run(training_run).data
    train_params = {
        key: value for key, value in trained.params.items() if key.startswith(("model.", "train."))
    }
    tags = {
        **{key: f"{value:.6f}" for key, value in metrics.items()},
        **train_params,
        **version_tags,
    }
    # The DVC experiment's name, which the training run carries, names the version too.
    experiment_name = trained.tags.get(DVC_EXPERIMENT_TAG)
    if experiment_name:
        tags[DVC_EXPERIMENT_TAG] = experiment_name
    try:
        version = create_version(client, name, model_id, training_run, tags)
        settings = ", ".join(
            f"{key.removeprefix('train.')} {train_params[key]}"
            for key in ("train.lr", "train.batch_size", "train.seed")
            if key in train_params
        )
        description = (
            f"{model_kind(train_params)} of training run {training_run}: "
            + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
            + f" after {train_params.get('train.max_iters', '?')} steps ({settings})"
        )
        client.update_model_version(name, version.version, description=description)
        aliases = set_aliases(client, name, version.version, metrics.get("val_loss"))
        return Registration(name, str(version.version), aliases)
    except MlflowException as error:
        raise PipelineError(
            f"cannot register the model as '{name}' (tracking.registered_model_name) in "
            f"{mlflow.get_registry_uri()}: {error.message.splitlines()[0]}"
        ) from None


def model_kind(logged_params: dict[str, str]) -> str:
    """ "Bigram model", or "GPT (3 layers, 4 heads, n_embd 32)", from a training run's params."""
    if logged_params.get("model.type", "bigram") == "bigram":
        return "Bigram model"
    sizes = (
        f"{logged_params.get('model.n_layer')} layers, {logged_params.get('model.n_head')} heads, "
        f"n_embd {logged_params.get('model.n_embd')}"
    )
    return f"GPT ({sizes})"


def create_version(
    client: mlflow.MlflowClient, name: str, model_id: str, run_id: str, tags: dict[str, str]
) -> ModelVersion:
    """A new version of the registered model ``name`` (created if new) from a logged model,
    naming ``run_id`` as its run: what mlflow.register_model does, which names the model's
    own run (here register's child run) instead."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )


def set_aliases(
    client: mlflow.MlflowClient, name: str, version: str, val_loss: float | None
) -> tuple[str, ...]:
    """``challenger`` for every new version; ``champion`` when its val loss beats the champion's.
    Returns the aliases the version got.

    The champion's val loss is its training run's (the version's tag is rounded). Two trainings
    finishing at the same instant may both see the old champion; the later write wins.
    """
    client.set_registered_model_alias(name, CHALLENGER, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    champion_loss = math.inf
    if champion is not None and champion.run_id is not None:
        champion_metrics = client.get_run(champion.run_id).data.metrics
        champion_loss = champion_metrics.get(
            "val_loss", float(champion.tags.get("val_loss", "inf"))
        )
    if champion is None or (val_loss is not None and val_loss < champion_loss):
        client.set_registered_model_alias(name, CHAMPION, version)
        return (CHAMPION, CHALLENGER)
    return (CHALLENGER,)
