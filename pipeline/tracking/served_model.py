"""The pyfunc MLflow serves: prompts in (a DataFrame), generated texts out.

``TextModel`` holds the weights, the vocabulary and the training's sampling defaults, and
answers through pipeline.lm.sampling, as the sample stage and the generate command do. MLflow
rebuilds it from served_model_entry.py (models-from-code) when the model is loaded or served;
``SIGNATURE`` and ``input_example`` are what registry logs with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from pipeline.errors import PipelineError
from pipeline.lm.models import load_model
from pipeline.lm.sampling import (
    Request,
    TextGenerator,
    check_row_count,
    check_total,
    checked_request,
    read_sampling_defaults,
)
from pipeline.lm.tokens import load_vocab

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
            ColSpec(AnyType(), "top_k", required=False),
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


class TextModel(PythonModel):
    """Prompts in (a DataFrame with a ``prompt`` column), generated texts out."""

    def load_context(self, context) -> None:
        chars = load_vocab(Path(context.artifacts["vocab"]))
        model = load_model(Path(context.artifacts["weights"]), len(chars))
        # The registered sample params, an artifact rather than a model_config, which MLflow
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
            self._value(row, "top_k", batch, defaults.top_k),
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
