"""Stage 4, evaluate: exact losses against the uniform baseline and the bigram optimum.

Writes metrics.json for `dvc metrics` and logs the same numbers into its own child run of the
training run (found by model.pt's sha256) and adds them to the training run, plus a picture of
the learned next-character table beside the one counted from the corpus
(pipeline.lm.heatmap).

- train_loss, val_loss: mean loss over every bigram of each split (exact).
- uniform_loss: ln(V), a uniform guess (4.1744 for V = 65).
- val_improvement_over_uniform: uniform_loss - val_loss.
- train_bigram_optimum: H(next | current) from the train split's bigram counts, the lowest
  train loss any bigram model can reach (2.4519 on Tiny Shakespeare): lower would be a bug.
- train_gap_to_optimum: train_loss - train_bigram_optimum (>= 0).
- val_counts_model_loss: val loss of the counting model, add-one smoothed train counts, the
  best a bigram estimated from the train split does on val in practice.
"""

from __future__ import annotations

import math

import mlflow
import torch

from pipeline.cli import stage_entry_point
from pipeline.determinism import pin_threads
from pipeline.errors import PipelineError
from pipeline.files import file_sha256, outputs_removed_on_failure, write_json
from pipeline.lm.bigram import load_model
from pipeline.lm.counts import (
    bigram_counts,
    bigram_loss_from_counts,
    conditional_entropy,
    counts_model_loss,
    next_token_frequencies,
    uniform_loss,
)
from pipeline.lm.heatmap import plot_next_char_probs
from pipeline.lm.tokens import load_encoded_corpus, to_device_tokens
from pipeline.params import load_params
from pipeline.paths import (
    METRICS_PATH,
    MODEL_PATH,
    PROBS_PLOT_PATH,
    TRAIN_TOKENS_PATH,
    VAL_TOKENS_PATH,
    VOCAB_PATH,
)
from pipeline.tracking import lineage, runs


def compute_metrics(
    logits: torch.Tensor, train_counts: torch.Tensor, val_counts: torch.Tensor
) -> dict[str, float]:
    vocab_size = logits.shape[0]
    train_loss = bigram_loss_from_counts(logits, train_counts).item()
    val_loss = bigram_loss_from_counts(logits, val_counts).item()
    optimum = conditional_entropy(train_counts)
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "uniform_loss": uniform_loss(vocab_size),
        "val_improvement_over_uniform": uniform_loss(vocab_size) - val_loss,
        "train_bigram_optimum": optimum,
        "train_gap_to_optimum": train_loss - optimum,
        "val_counts_model_loss": counts_model_loss(train_counts, val_counts),
    }


def check_metrics_finite(metrics: dict[str, float]) -> None:
    """A model whose losses are not numbers (weights of a diverged run) gives no metrics.json:
    NaN is not valid JSON, and no comparison with it means anything."""
    broken = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if broken:
        shown = ", ".join(f"{name} {value}" for name, value in broken.items())
        raise PipelineError(
            f"{MODEL_PATH} gives {shown}: its weights are not finite numbers (a diverged "
            "training run); rerun `dvc repro train`, with a lower train.lr if it diverges again"
        )


def main() -> None:
    pin_threads()
    params = load_params()
    chars, splits = load_encoded_corpus(VOCAB_PATH, (TRAIN_TOKENS_PATH, VAL_TOKENS_PATH))
    model = load_model(MODEL_PATH, len(chars))
    logits = model.token_embedding_table.weight.detach()
    train_counts, val_counts = (
        bigram_counts(to_device_tokens(tokens, "cpu"), len(chars)) for tokens in splits
    )
    # Before the run starts and before any output is removed: a bad model changes nothing.
    metrics = compute_metrics(logits, train_counts, val_counts)
    check_metrics_finite(metrics)
    training_run = lineage.training_run_id(params, file_sha256(MODEL_PATH))

    with (
        runs.model_run("evaluate", params, training_run, stage_params={}),
        outputs_removed_on_failure(METRICS_PATH, PROBS_PLOT_PATH),
    ):
        plot_next_char_probs(
            model.next_token_probs().detach().numpy(),
            next_token_frequencies(train_counts).numpy(),
            chars,
            train_counts.sum(dim=1).numpy(),
            PROBS_PLOT_PATH,
        )
        write_json(METRICS_PATH, metrics)
        # Logged at the last training step: the run's latest value is then exactly metrics.json's.
        step = lineage.last_step(training_run, "val_loss")
        mlflow.log_metrics(metrics, step=step)
        mlflow.log_artifact(str(METRICS_PATH))
        mlflow.log_artifact(str(PROBS_PLOT_PATH))
        # The training run, which users compare, gets the same, without being resumed.
        runs.add_to_run(training_run, metrics, step, (METRICS_PATH, PROBS_PLOT_PATH))
    for name, value in metrics.items():
        print(f"{name:>30}: {value:.4f}")


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
