"""The trained model as a text generator in MLflow: logged as a pyfunc, registered, served.

Beside the PyTorch flavour (``model``, for ``mlflow.pytorch.load_model``), each training logs
``generator``: a pyfunc that takes prompts and returns text, holding the weights and the
vocabulary. It is registered in the Model Registry under ``tracking.registered_model_name``, one
version per training, so that

    mlflow models serve -m models:/bigram-shakespeare/latest --env-manager local

answers ``POST /invocations`` with ``{"dataframe_records": [{"prompt": "ROMEO:", "chars": 200}]}``
by ``{"predictions": ["ROMEO:..."]}``. The columns ``chars``, ``temperature`` and ``seed`` are
optional; their defaults, and the ``max_chars`` bound, are the training's ``sample`` params.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pipeline import tracking
from pipeline.data import load_vocab
from pipeline.errors import PipelineError
from pipeline.model import load_model
from pipeline.params import Params
from pipeline.textgen import TextGenerator, check_request

GENERATOR_ARTIFACT = "generator"

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "chars", required=False),
            ColSpec("double", "temperature", required=False),
            ColSpec("long", "seed", required=False),
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


class BigramTextModel(mlflow.pyfunc.PythonModel):
    """Prompts in (a DataFrame with a ``prompt`` column), generated texts out."""

    def load_context(self, context) -> None:
        chars = load_vocab(Path(context.artifacts["vocab"]))
        model = load_model(Path(context.artifacts["weights"]), len(chars))
        self.generator = TextGenerator(model, chars)
        self.defaults = dict(context.model_config)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        return [self.generate(row) for row in model_input.to_dict("records")]

    def generate(self, request: dict) -> str:
        num_chars = int(self._value(request, "chars", self.defaults["num_chars"]))
        temperature = float(self._value(request, "temperature", self.defaults["temperature"]))
        seed = int(self._value(request, "seed", self.defaults["seed"]))
        try:
            check_request(num_chars, temperature, self.defaults["max_chars"])
            return self.generator.generate(str(request["prompt"]), num_chars, temperature, seed)
        except PipelineError as error:
            # The scoring server answers an MlflowException with HTTP 400 and this message.
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None

    @staticmethod
    def _value(request: dict, column: str, default):
        # Rows of a batch that leave an optional column out carry NaN there.
        value = request.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return default
        return value


def log_text_generator(weights_path: Path, vocab_path: Path, params: Params):
    """Log the pyfunc generator into the active run; returns MLflow's ModelInfo."""
    pipeline_package = Path(__file__).resolve().parent
    sample = params.sample
    return mlflow.pyfunc.log_model(
        name=GENERATOR_ARTIFACT,
        python_model=str(pipeline_package / "generator_model.py"),
        artifacts={"weights": str(weights_path), "vocab": str(vocab_path)},
        code_paths=[str(pipeline_package)],
        model_config={
            "num_chars": sample.num_chars,
            "temperature": sample.temperature,
            "seed": sample.seed,
            "max_chars": sample.max_chars,
        },
        signature=SIGNATURE,
        input_example=input_example(load_vocab(vocab_path)),
        # Listing requirements skips MLflow's slow inference of them from a subprocess.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            f"pandas=={pd.__version__}",
        ],
    )


def register_version(
    model_uri: str, params: Params, run_id: str, metrics: dict[str, float]
) -> ModelVersion:
    """Register the generator as a new version of the registered model, its metrics attached.

    The registry numbers versions itself: parallel trainings (``dvc queue start -j 4``) each
    get their own version, the SQL store retrying when two claim the same number.
    """
    name = params.tracking.registered_model_name
    train = params.train
    tags = {
        **{key: f"{value:.6f}" for key, value in metrics.items()},
        "lr": str(train.lr),
        "batch_size": str(train.batch_size),
        "max_iters": str(train.max_iters),
    }
    if tracking.dvc_experiment_name():
        tags["dvc.exp_name"] = tracking.dvc_experiment_name()
    try:
        version = mlflow.register_model(model_uri, name, tags=tags)
        description = (
            f"Bigram model of run {run_id}: "
            + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
            + f" after {train.max_iters} steps (lr {train.lr}, batch_size {train.batch_size},"
            f" seed {train.seed})"
        )
        return mlflow.MlflowClient().update_model_version(
            name, version.version, description=description
        )
    except MlflowException as error:
        raise PipelineError(
            f"cannot register the model as '{name}' (tracking.registered_model_name) in "
            f"{mlflow.get_registry_uri()}: {error.message.splitlines()[0]}"
        ) from None
