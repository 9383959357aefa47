"""Stage 6, sample: generate text from the trained model, starting from a newline.

The text is written to data/sample/sample.txt and logged into the stage's own child run of the
training run (found by model.pt's sha256), and added to the training run. Sampling is seeded
(sample.seed), so the same model and params give the same text.
"""

from __future__ import annotations

import mlflow

from pipeline.cli import stage_entry_point
from pipeline.files import file_sha256, outputs_removed_on_failure, write_text
from pipeline.lm.models import load_model
from pipeline.lm.sampling import TextGenerator
from pipeline.lm.tokens import load_vocab
from pipeline.params import load_params
from pipeline.paths import MODEL_PATH, SAMPLE_PATH, VOCAB_PATH
from pipeline.tracking import lineage, runs


def main() -> None:
    params = load_params()
    config = params.sample
    chars = load_vocab(VOCAB_PATH)
    model = load_model(MODEL_PATH, len(chars))
    training_run = lineage.training_run_id(params, file_sha256(MODEL_PATH))

    with (
        runs.model_run("sample", params, training_run, params.flat("sample")),
        outputs_removed_on_failure(SAMPLE_PATH),
    ):
        generator = TextGenerator(model, chars, defaults=config)
        text = generator.complete(generator.request())
        write_text(SAMPLE_PATH, text)
        mlflow.log_text(text, "samples/sample.txt")
        runs.add_to_run(training_run, texts={"samples/sample.txt": text})
    print(text)


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
