"""Stage 3, train: fit the model of model.type (bigram or gpt); log its params and loss curve.

The loops themselves are in ``pipeline.lm.training``: ``method: minibatch`` is the lecture's AdamW
loop, ``method: counts`` full-batch L-BFGS on the bigram counts. At every eval point a bigram's
loss over the whole train and val splits is computed exactly from their bigram counts (O(V^2)); a
GPT's is the lecture's estimate, the mean of train.eval_iters random batches per split (the run's
description says which). The loss is read back from the device only there, never per step;
the evaluate stage computes the GPT's exact losses.

The run is named after the DVC experiment (``<branch>@<short commit>`` under a plain `dvc repro`)
and tagged with the sha256 of model.pt, by which evaluate, sample and the link stage find it:
no run id enters a file DVC hashes. data/train/run.json, which `dvc exp show` lists, names it.
Logging the model for serving and registering it is the register stage's job
(pipeline/stages/register.py), so training reads only the data and train params, and a change to
serving never retrains.
"""

from __future__ import annotations

import sys

import mlflow
import pandas as pd
import torch
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from tqdm import tqdm

from pipeline.cli import stage_entry_point
from pipeline.determinism import pin_threads
from pipeline.files import atomic_path, file_sha256, outputs_removed_on_failure, read_json
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts
from pipeline.lm.models import LanguageModel, new_model, save_model
from pipeline.lm.sizes import check_model_fits, machine_memory_bytes
from pipeline.lm.tokens import load_encoded_corpus, to_device_tokens
from pipeline.lm.training import (
    check_losses_finite,
    estimated_losses,
    exact_losses,
    fit,
    out_of_memory_as_error,
    resolve_device,
)
from pipeline.params import Params, TrainParams, check_block_size, load_params
from pipeline.paths import (
    LOSS_CURVE_PATH,
    MANIFEST_FIELDS,
    MANIFEST_PATH,
    MODEL_PATH,
    RUN_INFO_PATH,
    TRAIN_TOKENS_PATH,
    VAL_TOKENS_PATH,
    VOCAB_PATH,
)
from pipeline.tracking import lineage, rebuild, run_record, runs


def load_splits(
    device: torch.device, max_vocab_size: int
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The vocabulary; the train and val tokens on the device, and their bigram counts."""
    vocab, (train_tokens, val_tokens) = load_encoded_corpus(
        VOCAB_PATH, (TRAIN_TOKENS_PATH, VAL_TOKENS_PATH), max_vocab_size
    )
    vocab_size = len(vocab)
    splits = {
        "train_tokens": to_device_tokens(train_tokens, device),
        "val_tokens": to_device_tokens(val_tokens, device),
    }
    splits["train_counts"] = bigram_counts(splits["train_tokens"], vocab_size)
    splits["val_counts"] = bigram_counts(splits["val_tokens"], vocab_size)
    return vocab, splits


def loss_curve_note(model: LanguageModel, config: TrainParams) -> str:
    """The run's description (on its page, not a column of the runs table): what its curve is."""
    if isinstance(model, BigramLanguageModel):
        return "Loss curve: exact, every bigram of both splits, from the counts."
    return (
        f"Loss curve: the lecture's estimate, the mean of {config.eval_iters} random batches per "
        "split (train.eval_iters); the final train_loss and val_loss are exact (evaluate)."
    )


def losses_at_eval_point(
    model: LanguageModel, splits: dict[str, torch.Tensor], config: TrainParams
) -> tuple[float, float]:
    if isinstance(model, BigramLanguageModel):
        return exact_losses(model, splits["train_counts"], splits["val_counts"])
    return estimated_losses(model, splits["train_tokens"], splits["val_tokens"], config)


def train_model(
    model: LanguageModel,
    splits: dict[str, torch.Tensor],
    config: TrainParams,
    datasets: dict,
) -> list[dict]:
    """Fit the model; log its losses at every eval point; return the curve."""
    curve: list[dict] = []
    progress = tqdm(
        total=config.max_iters, desc="train", unit="step", disable=None, file=sys.stderr
    )

    def on_eval(step: int) -> None:
        train_loss, val_loss = losses_at_eval_point(model, splits, config)
        check_losses_finite(step, train_loss, val_loss, config)
        curve.append({"step": step, "train_loss": train_loss, "val_loss": val_loss})
        lineage.log_losses(curve[-1], datasets)
        tqdm.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")

    fit(model, splits["train_tokens"], splits["train_counts"], config, on_eval, progress)
    progress.close()
    return curve


def save_outputs(model: LanguageModel, curve: list[dict]) -> None:
    save_model(model, MODEL_PATH)
    with atomic_path(LOSS_CURVE_PATH) as tmp_path:
        pd.DataFrame(curve).to_csv(tmp_path, index=False)
    mlflow.log_artifact(str(LOSS_CURVE_PATH))
    mlflow.log_artifact(str(VOCAB_PATH))


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """The memory a model trains in, and what it is called in an error."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], f"the GPU {torch.cuda.get_device_name(device)}"
    return machine_memory_bytes(), "this machine"


def main() -> None:
    params = load_params()
    pin_threads(params.train.threads)
    # A failed allocation anywhere in training (counts, batches, optimizer state) is one line.
    with out_of_memory_as_error(params.train):
        train_and_log(params)


def train_and_log(params: Params) -> None:
    config = params.train
    corpus_sha256 = read_json(MANIFEST_PATH, MANIFEST_FIELDS)["corpus_sha256"]
    device = resolve_device(config.device)
    vocab, splits = load_splits(device, params.data.max_vocab_size)
    check_block_size(config.block_size, len(splits["train_tokens"]), len(splits["val_tokens"]))
    check_model_fits(params, len(vocab), *device_memory(device))
    datasets = lineage.training_datasets(params, corpus_sha256)
    torch.manual_seed(config.seed)
    model = new_model(params, len(vocab)).to(device)

    with (
        runs.stage_run("train", params, run_name=runs.run_name(params)) as run,
        # Ctrl-C or an error after the model is saved must not leave it without its run.json.
        outputs_removed_on_failure(MODEL_PATH, LOSS_CURVE_PATH, RUN_INFO_PATH),
    ):
        run_tags = {
            "device": str(device),
            MLFLOW_RUN_NOTE: loss_curve_note(model, config),
            **rebuild.record(device),
        }
        lineage.log_training_inputs(params, corpus_sha256, run_tags, datasets)
        curve = train_model(model, splits, config, datasets)
        save_outputs(model, curve)
        model_sha256 = file_sha256(MODEL_PATH)
        mlflow.set_tag(lineage.MODEL_TAG, model_sha256)
        run_record.write_run_record(run.info.run_id, model_sha256)


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
