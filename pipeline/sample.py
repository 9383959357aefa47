"""Stage 5, sample: generate text from the trained model, starting from a newline.

The text is written to data/sample/sample.txt and logged into the training run. Sampling is
seeded (sample.seed), so the same model and params give the same text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow

from pipeline import tracking
from pipeline.data import load_vocab
from pipeline.errors import stage_entry_point
from pipeline.files import outputs_removed_on_failure, read_json, write_text
from pipeline.model import load_model
from pipeline.params import load_params
from pipeline.textgen import TextGenerator
from pipeline.train import MODEL_PATH, RUN_INFO_FIELDS, RUN_INFO_PATH
from pipeline.vocab import VOCAB_PATH

SAMPLE_PATH = Path("data/sample/sample.txt")


def main() -> None:
    params = load_params()
    config = params.sample
    chars = load_vocab(VOCAB_PATH)
    model = load_model(MODEL_PATH, len(chars))
    training_run_id = read_json(RUN_INFO_PATH, RUN_INFO_FIELDS)["mlflow_run_id"]
    stage_params = {f"sample.{name}": value for name, value in dataclasses.asdict(config).items()}

    with (
        tracking.model_run("sample", params, training_run_id, stage_params),
        outputs_removed_on_failure(SAMPLE_PATH),
    ):
        generator = TextGenerator(model, chars)
        text = generator.generate("", config.num_chars, config.temperature, config.seed)
        write_text(SAMPLE_PATH, text)
        mlflow.log_text(text, "samples/sample.txt")
    print(text)


if __name__ == "__main__":
    stage_entry_point(main)()
