"""Stage 5, sample: generate text from the trained model, starting from a newline.

The text is written to data/sample/sample.txt and logged into the training run. Sampling is
seeded (sample.seed), so the same model and params give the same text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import torch

from pipeline import tracking
from pipeline.data import load_vocab
from pipeline.errors import stage_entry_point
from pipeline.files import outputs_removed_on_failure, read_json, write_text
from pipeline.model import BigramLanguageModel, load_model
from pipeline.params import load_params
from pipeline.train import MODEL_PATH, RUN_INFO_PATH
from pipeline.vocab import VOCAB_PATH

SAMPLE_PATH = Path("data/sample/sample.txt")


def generate_text(
    model: BigramLanguageModel,
    chars: list[str],
    num_chars: int,
    temperature: float,
    seed: int,
    start: str = "\n",
) -> str:
    """Sample num_chars characters after `start` (the lecture starts from token 0, a newline)."""
    start_id = chars.index(start) if start in chars else 0
    generator = torch.Generator().manual_seed(seed)
    context = torch.tensor([[start_id]], dtype=torch.long)
    tokens = model.generate(context, num_chars, temperature=temperature, generator=generator)
    return "".join(chars[i] for i in tokens[0, 1:].tolist())


def main() -> None:
    params = load_params()
    config = params.sample
    chars = load_vocab(VOCAB_PATH)
    model = load_model(MODEL_PATH, len(chars))
    training_run_id = read_json(RUN_INFO_PATH)["mlflow_run_id"]
    stage_params = {f"sample.{name}": value for name, value in dataclasses.asdict(config).items()}

    with (
        tracking.model_run("sample", params, training_run_id, stage_params),
        outputs_removed_on_failure(SAMPLE_PATH),
    ):
        text = generate_text(model, chars, config.num_chars, config.temperature, config.seed)
        write_text(SAMPLE_PATH, text)
        mlflow.log_text(text, "samples/sample.txt")
    print(text)


if __name__ == "__main__":
    stage_entry_point(main)()
