"""Stage 4, evaluate: exact losses against the uniform baseline and the bigram optimum.

Writes metrics.json for `dvc metrics` and logs the same numbers into its own child run of the
training run (found by model.pt's sha256) and adds them to the training run, plus a picture of
the learned next-character table beside the one counted from the corpus
(pipeline.lm.heatmap); a GPT's table is its prediction from the current character alone.

Every model is measured against the same baselines, so the table shows what context buys:

- train_loss, val_loss: mean loss over every target of each split, exact. A bigram's comes
  from the bigram counts; a GPT's from sliding windows (pipeline.lm.gpt.sliding_window_loss),
  each target counted once and predicted from the characters before it: all of them, up to
  train.block_size, for a block of up to 8 (the lecture's); for longer blocks the windows
  slide by an eighth of a block, and each target sees at least 7/8 of block_size characters
  (the first window's, fewer), at an eighth of the cost. A GPT's train_loss covers the first
  GPT_TRAIN_TOKENS tokens of the train split (the whole split would take minutes on a CPU);
  its val_loss the whole val split.
- train_bits_per_char, val_bits_per_char: the same losses in bits (nats / ln 2).
- uniform_loss: ln(V), a uniform guess (4.1744 for V = 65).
- val_improvement_over_uniform: uniform_loss - val_loss.
- train_bigram_optimum: H(next | current) from the train split's bigram counts, the lowest
  train loss any bigram model can reach (2.4519 on Tiny Shakespeare): lower would be a bug.
- train_gap_to_optimum: train_loss - train_bigram_optimum (>= 0 for a bigram; a GPT, which
  sees more than one character, goes below).
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
from pipeline.lm.counts import (
    bigram_counts,
    bigram_loss_from_counts,
    conditional_entropy,
    counts_model_loss,
    next_token_frequencies,
    uniform_loss,
)
from pipeline.lm.gpt import GPTLanguageModel, sliding_window_loss
from pipeline.lm.heatmap import plot_next_char_probs
from pipeline.lm.models import LanguageModel, load_model
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

# A GPT's train loss is over this many tokens at the start of the train split; the val loss
# over the whole val split (111,540 tokens of Tiny Shakespeare).
GPT_TRAIN_TOKENS = 100_000


def window_stride(block_size: int) -> int:
    """How far the evaluation windows slide: 1 (every target with its whole context) up to a
    block of 8, an eighth of the block beyond."""
    return max(1, block_size // 8)


def exact_losses(
    model: LanguageModel, splits: list[torch.Tensor], counts: list[torch.Tensor]
) -> tuple[float, float]:
    """The exact train and val losses (see the module's docstring)."""
    if isinstance(model, GPTLanguageModel):
        train_tokens, val_tokens = splits
        stride = window_stride(model.config.block_size)
        return (
            sliding_window_loss(model, train_tokens[:GPT_TRAIN_TOKENS], stride),
            sliding_window_loss(model, val_tokens, stride),
        )
    logits = model.token_embedding_table.weight.detach()
    train_counts, val_counts = counts
    return (
        bigram_loss_from_counts(logits, train_counts).item(),
        bigram_loss_from_counts(logits, val_counts).item(),
    )


def compute_metrics(
    train_loss: float, val_loss: float, train_counts: torch.Tensor, val_counts: torch.Tensor
) -> dict[str, float]:
    vocab_size = train_counts.shape[0]
    optimum = conditional_entropy(train_counts)
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "train_bits_per_char": train_loss / math.log(2),
        "val_bits_per_char": val_loss / math.log(2),
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
    pin_threads()  # one thread: the exact losses must not depend on train.threads
    params = load_params()
    chars, splits = load_encoded_corpus(VOCAB_PATH, (TRAIN_TOKENS_PATH, VAL_TOKENS_PATH))
    model = load_model(MODEL_PATH, len(chars))
    tokens = [to_device_tokens(split, "cpu") for split in splits]
    train_counts, val_counts = (bigram_counts(split, len(chars)) for split in tokens)
    # Before the run starts and before any output is removed: a bad model changes nothing.
    train_loss, val_loss = exact_losses(model, tokens, [train_counts, val_counts])
    metrics = compute_metrics(train_loss, val_loss, train_counts, val_counts)
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
