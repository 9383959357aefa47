"""The trained model in MLflow: logged in two flavours, registered, served.

Each training logs ``model`` (PyTorch, for ``mlflow.pytorch.load_model``) and ``generator``: a
pyfunc that takes prompts and returns text, holding the weights and the vocabulary. Both carry
the training's ``sample`` params as their sampling defaults (pipeline.textgen), and the pipeline
modules of the train stage's deps as their code. The generator is registered in the Model
Registry under ``tracking.registered_model_name``, one version per training, so that

    mlflow models serve -m models:/bigram-shakespeare@champion --env-manager local

answers ``POST /invocations`` with ``{"dataframe_records": [{"prompt": "ROMEO:", "chars": 200}]}``
by ``{"predictions": ["ROMEO:..."]}``. The columns ``chars``, ``temperature`` and ``seed`` are
optional; their defaults, and the ``max_chars`` bound, are the training's ``sample`` params.
``max_chars`` bounds the characters of the whole request, all rows together; a request holds at
most ``pipeline.textgen.MAX_REQUEST_ROWS`` rows (1,000) and prompts of ``MAX_PROMPT_CHARS``
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
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from pipeline import reproducibility
from pipeline.data import load_vocab
from pipeline.errors import PipelineError
from pipeline.model import BigramLanguageModel, load_model
from pipeline.params import Params
from pipeline.paths import MODEL_PATH, VOCAB_PATH
from pipeline.textgen import (
    Request,
    TextGenerator,
    check_row_count,
    check_total,
    checked_request,
    read_sampling_defaults,
)

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


# The numeric columns are AnyType because MLflow casts to a declared type silently: "long" turns
# chars 1.5 into 1 and 1e30 into -2**63. Values reach predict as sent, and checked_request checks
# them.
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec(AnyType(), "chars", required=False),
            ColSpec(AnyType(), "temperature", required=False),
            ColSpec(AnyType(), "seed", required=False),
        ]
    ),
    outputs=Schema([ColSpec("string")]),
)
EXAMPLE_PROMPT = "ROMEO:"


def input_example(chars: list[str]) -> pd.DataFrame:
    """A request the model can answer, which MLflow runs when logging it: "ROMEO:" when the
    vocabulary has its characters, else the vocabulary's first printable character."""
    if set(EXAMPLE_PROMPT) <= set(chars):
        prompt = EXAMPLE_PROMPT
    else:
        prompt = next((c for c in chars if c.isprintable() and not c.isspace()), chars[0])
    return pd.DataFrame({"prompt": [prompt], "chars": [100]})


class BigramTextModel(PythonModel):
    """Prompts in (a DataFrame with a ``prompt`` column), generated texts out."""

    def load_context(self, context) -> None:
        chars = load_vocab(Path(context.artifacts["vocab"]))
        model = load_model(Path(context.artifacts["weights"]), len(chars))
        # The training's sample params, an artifact rather than a model_config, which MLflow
        # would log again as unprefixed run params.
        defaults = read_sampling_defaults(Path(context.artifacts["defaults"]))
        self.generator = TextGenerator(model, chars, defaults)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        try:
            # The row count first, as reading the rows costs per row; then every row is
            # checked, and the request as a whole, before any is generated.
            check_row_count(len(model_input))
            requests = [self.checked(row, model_input) for row in model_input.to_dict("records")]
            check_total(requests, self.generator.defaults.max_chars)
            return [self.generator.complete(request) for request in requests]
        except PipelineError as error:
            # The scoring server answers an MlflowException with HTTP 400 and this message.
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None

    def checked(self, row: dict, batch: pd.DataFrame) -> Request:
        defaults = self.generator.defaults
        return checked_request(
            row.get("prompt"),
            self._value(row, "chars", batch, defaults.num_chars),
            self._value(row, "temperature", batch, defaults.temperature),
            self._value(row, "seed", batch, defaults.seed),
            defaults.max_chars,
        )

    @staticmethod
    def _value(row: dict, column: str, batch: pd.DataFrame, default):
        """The row's value, or the default where the row leaves the column out.

        pandas marks a row that leaves out a column other rows give with NaN, and JSON null
        reads as None or NaN too. So a gap counts as left out only where some other row gives
        the column; a column that no row gives a value (``temperature: NaN``) is checked as sent.
        """
        value = row.get(column)
        if column not in batch.columns or (_is_gap(value) and batch[column].notna().any()):
            return default
        return value


def _is_gap(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def log_and_register(
    model: BigramLanguageModel,
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
    package = Path(__file__).resolve().parent
    if not reproducibility.DVC_FILE.is_file():
        yield [str(package)]
        return
    with tempfile.TemporaryDirectory(prefix="bigram-code-") as scratch:
        target = Path(scratch) / package.name
        target.mkdir()
        for dep in reproducibility.stage_deps(REGISTER_STAGE):
            path = Path(dep)
            if path.parent.name == package.name and path.suffix == ".py":
                shutil.copy2(path, target / path.name)
        yield [str(target)]


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
    model: BigramLanguageModel, defaults_path: Path, step: int, code_paths: list[str]
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
            extra_files=[str(VOCAB_PATH), str(defaults_path)],
            step=step,
            pip_requirements=pip_requirements(),
        )
    return info.model_id


def log_text_generator(
    weights_path: Path, vocab_path: Path, defaults_path: Path, step: int, code_paths: list[str]
):
    """Log the pyfunc generator into the active run at ``step``; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=GENERATOR_ARTIFACT,
        python_model=str(Path(__file__).resolve().parent / "generator_model.py"),
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

    The version is tagged with its metrics, ``version_tags`` and every ``train.*`` param of the
    training run (named as the run logs them), and described in one line. The train params are
    read from the training run, not params.yaml: they are the ones the weights were trained
    with. The registry numbers versions itself: parallel trainings (``dvc queue start -j 4``)
    each get their own version, the SQL store retrying when two claim the same number.
    """
    name = params.tracking.registered_model_name
    client = mlflow.MlflowClient()
    trained = client.get_run(training_run).data
    train_params = {key: value for key, value in trained.params.items() if key.startswith("train.")}
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
            f"Bigram model of training run {training_run}: "
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
