"""Stage 3, train: fit the bigram model and log it, with its loss curve, to MLflow.

The loops themselves are in ``pipeline.training``: ``method: minibatch`` is the lecture's AdamW
loop, ``method: counts`` full-batch L-BFGS on the bigram counts. At every eval point the exact
loss over the whole train and val splits is computed from their bigram counts (O(V^2)), instead
of the lecture's estimate from 200 random batches; the loss is read back from the device only
there, never per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from tqdm import tqdm

from pipeline import reproducibility, tracking
from pipeline.data import bigram_counts, load_tokens, load_vocab, to_device_tokens
from pipeline.errors import stage_entry_point
from pipeline.files import atomic_path, outputs_removed_on_failure, read_json, write_json
from pipeline.model import BigramLanguageModel
from pipeline.params import Params, load_params
from pipeline.paths import (
    LOSS_CURVE_PATH,
    MANIFEST_PATH,
    MODEL_PATH,
    RUN_INFO_PATH,
    TRAIN_TOKENS_PATH,
    VAL_TOKENS_PATH,
    VOCAB_PATH,
)
from pipeline.training import (
    check_block_size,
    exact_losses,
    resolve_device,
    train_minibatch,
    train_on_counts,
)

MODEL_ARTIFACT = "model"


def log_training_run_inputs(params: Params, manifest: dict, device: torch.device) -> None:
    """Params, tags and the corpus as a dataset input, so a model can be traced to its data."""
    train_params = {
        name: value for name, value in params.flat().items() if name.startswith("train.")
    }
    other_params = {
        name: value for name, value in params.flat().items() if name not in train_params
    }
    # The model's hyperparameters go in bare (lr, batch_size), as MLflow users compare them.
    mlflow.log_params({name.removeprefix("train."): value for name, value in train_params.items()})
    mlflow.log_params(other_params)
    mlflow.set_tags(reproducibility.record(device))
    mlflow.set_tags(
        {
            "device": str(device),
            "corpus_sha256": manifest["corpus_sha256"],
            "corpus_source": manifest["corpus_source"],
            "download_run_id": manifest["download_run_id"],
            "vocab_run_id": manifest["vocab_run_id"],
        }
    )
    corpus = MetaDataset(
        source=HTTPDatasetSource(params.data.url),
        name="tinyshakespeare",
        digest=manifest["corpus_sha256"][:16],
    )
    mlflow.log_input(corpus, context="training")


def log_model(model: BigramLanguageModel, params: Params) -> None:
    """Log the model in MLflow's PyTorch format, with its vocabulary."""
    import mlflow.pytorch

    pipeline_package = Path(__file__).resolve().parent
    mlflow.pytorch.log_model(
        model.cpu(),
        name=MODEL_ARTIFACT,
        # Pickle keeps the full module, so mlflow.pytorch.load_model returns a model that
        # can .generate(); "pt2" would save only the traced forward pass.
        serialization_format="pickle",
        code_paths=[str(pipeline_package)],
        extra_files=[str(VOCAB_PATH)],
        # Listing requirements skips MLflow's slow inference of them from a subprocess.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
        ],
    )


def register_text_generator(params: Params, run_id: str, final_eval: dict) -> None:
    """Log the model as a pyfunc that generates text and register it as a new version."""
    # Imported here: evaluate and sample import this module and need none of the pyfunc machinery.
    from pipeline import serving

    generator = serving.log_text_generator(MODEL_PATH, VOCAB_PATH, params)
    metrics = {"train_loss": final_eval["train_loss"], "val_loss": final_eval["val_loss"]}
    serving.register_version(generator.model_uri, params, run_id, metrics)


def main() -> None:
    params = load_params()
    config = params.train
    manifest = read_json(MANIFEST_PATH)
    vocab = load_vocab(VOCAB_PATH)
    device = resolve_device(config.device)
    train_tokens = to_device_tokens(load_tokens(TRAIN_TOKENS_PATH), device)
    val_tokens = to_device_tokens(load_tokens(VAL_TOKENS_PATH), device)
    check_block_size(config.block_size, len(train_tokens), len(val_tokens))
    train_counts = bigram_counts(train_tokens, len(vocab))
    val_counts = bigram_counts(val_tokens, len(vocab))

    torch.manual_seed(config.seed)
    model = BigramLanguageModel(len(vocab)).to(device)
    curve: list[dict] = []

    with (
        tracking.stage_run("train", params, run_name=tracking.dvc_experiment_name()) as run,
        # Ctrl-C or an error after the model is saved must not leave it without its run.json.
        outputs_removed_on_failure(MODEL_PATH, LOSS_CURVE_PATH, RUN_INFO_PATH),
    ):
        log_training_run_inputs(params, manifest, device)
        progress = tqdm(
            total=config.max_iters, desc="train", unit="step", disable=None, file=sys.stderr
        )

        def on_eval(step: int) -> None:
            train_loss, val_loss = exact_losses(model, train_counts, val_counts)
            curve.append({"step": step, "train_loss": train_loss, "val_loss": val_loss})
            mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss}, step=step)
            tqdm.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")

        fit = train_on_counts if config.method == "counts" else train_minibatch
        fit(
            model,
            train_counts if config.method == "counts" else train_tokens,
            config,
            on_eval,
            progress,
        )
        progress.close()

        with atomic_path(MODEL_PATH) as tmp_path:
            torch.save(model.state_dict(), tmp_path)
        with atomic_path(LOSS_CURVE_PATH) as tmp_path:
            pd.DataFrame(curve).to_csv(tmp_path, index=False)
        mlflow.log_artifact(str(LOSS_CURVE_PATH))
        mlflow.log_artifact(str(VOCAB_PATH))
        log_model(model, params)
        register_text_generator(params, run.info.run_id, curve[-1])
        write_json(RUN_INFO_PATH, {"mlflow_run_id": run.info.run_id})


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
