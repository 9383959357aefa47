"""Stage 3, train: fit the bigram model and log it, with its loss curve, to MLflow.

The loops themselves are in ``pipeline.training``: ``method: minibatch`` is the lecture's AdamW
loop, ``method: counts`` full-batch L-BFGS on the bigram counts. At every eval point the exact
loss over the whole train and val splits is computed from their bigram counts (O(V^2)), instead
of the lecture's estimate from 200 random batches; the loss is read back from the device only
there, never per step.

The run is named after the DVC experiment (``<branch>@<short commit>`` under a plain `dvc repro`)
and tagged with the sha256 of model.pt, by which evaluate, sample and the link stage find it:
no run id enters a file DVC hashes. data/train/run.json, which `dvc exp show` lists, names it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from tqdm import tqdm

from pipeline import reproducibility, runrecord, tracking
from pipeline.data import bigram_counts, load_tokens, load_vocab, to_device_tokens
from pipeline.errors import stage_entry_point
from pipeline.files import (
    atomic_path,
    file_sha256,
    outputs_removed_on_failure,
    read_json,
)
from pipeline.model import BigramLanguageModel, save_model
from pipeline.params import Params, load_params
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
from pipeline.secrets import masked
from pipeline.training import (
    check_block_size,
    exact_losses,
    resolve_device,
    train_minibatch,
    train_on_counts,
)

MODEL_ARTIFACT = "model"


def split_datasets(params: Params, manifest: dict) -> dict[str, MetaDataset]:
    """The corpus and its train and val splits as MLflow datasets (digest: their sha256)."""
    source = HTTPDatasetSource(masked(params.data.url))
    return {
        "corpus": MetaDataset(source, name=params.data.name, digest=manifest["corpus_sha256"][:16]),
        "train": MetaDataset(
            source, name=f"{params.data.name}-train", digest=file_sha256(TRAIN_TOKENS_PATH)[:16]
        ),
        "val": MetaDataset(
            source, name=f"{params.data.name}-val", digest=file_sha256(VAL_TOKENS_PATH)[:16]
        ),
    }


def log_training_run_inputs(
    params: Params, manifest: dict, device: torch.device, datasets: dict[str, MetaDataset]
) -> None:
    """Params, tags and datasets, so a model can be traced to its data and code."""
    # Every param once, named as DVC names it (`train.lr`, `sample.temperature`).
    mlflow.log_params(params.flat())
    mlflow.set_tags(reproducibility.record(device))
    run = mlflow.active_run()
    experiment_id = run.info.experiment_id
    lineage = {
        "download_run_id": tracking.find_run(
            experiment_id, "download", tracking.CORPUS_TAG, manifest["corpus_sha256"]
        ),
        "vocab_run_id": tracking.find_run(
            experiment_id, "vocab", tracking.MANIFEST_TAG, file_sha256(MANIFEST_PATH)
        ),
    }
    mlflow.set_tags(
        {
            "device": str(device),
            tracking.CORPUS_TAG: manifest["corpus_sha256"],
            **{name: run_id for name, run_id in lineage.items() if run_id},
        }
    )
    tracking.log_datasets(
        run.info.run_id,
        {"training": datasets["corpus"], "train": datasets["train"], "validation": datasets["val"]},
    )


@contextlib.contextmanager
def model_code() -> Iterator[list[str]]:
    """The pipeline modules the logged models carry: the train stage's code deps in dvc.yaml.

    The registered model then holds exactly the code that `dvc repro` reruns training for, so a
    change to any module it needs makes a new version. Outside a project, the whole package.
    The copy lives in a temporary directory for as long as the models are being logged.
    """
    package = Path(__file__).resolve().parent
    if not reproducibility.DVC_FILE.is_file():
        yield [str(package)]
        return
    with tempfile.TemporaryDirectory(prefix="bigram-code-") as scratch:
        target = Path(scratch) / package.name
        target.mkdir()
        for dep in reproducibility.stage_deps(reproducibility.TRAIN_STAGE):
            path = Path(dep)
            if path.parent.name == package.name and path.suffix == ".py":
                shutil.copy2(path, target / path.name)
        yield [str(target)]


def log_losses(point: dict, datasets: dict[str, MetaDataset], model_id: str | None = None) -> None:
    """Log one point of the loss curve, each loss linked to its split (and to a logged model)."""
    for split in ("train", "val"):
        mlflow.log_metric(
            f"{split}_loss",
            point[f"{split}_loss"],
            step=point["step"],
            dataset=datasets[split],
            model_id=model_id,
        )


def log_model(
    model: BigramLanguageModel, params: Params, step: int = 0, code_paths: list[str] | None = None
) -> str:
    """Log the model in MLflow's PyTorch format, with its vocabulary; returns its model id."""
    import mlflow.pytorch

    info = mlflow.pytorch.log_model(
        model.cpu(),
        name=MODEL_ARTIFACT,
        # Pickle keeps the full module, so mlflow.pytorch.load_model returns a model that
        # can .generate(); "pt2" would save only the traced forward pass.
        serialization_format="pickle",
        code_paths=code_paths or [str(Path(__file__).resolve().parent)],
        extra_files=[str(VOCAB_PATH)],
        step=step,
        # Listing requirements skips MLflow's slow inference of them from a subprocess.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
        ],
    )
    return info.model_id


def register_text_generator(
    params: Params,
    run_id: str,
    final_eval: dict,
    step: int = 0,
    code_paths: list[str] | None = None,
) -> str:
    """Log the model as a pyfunc that generates text, register it as a new version; returns the
    logged model's id."""
    # Imported here: only training needs the pyfunc machinery.
    from pipeline import serving

    generator = serving.log_text_generator(
        MODEL_PATH, VOCAB_PATH, params, step=step, code_paths=code_paths
    )
    metrics = {"train_loss": final_eval["train_loss"], "val_loss": final_eval["val_loss"]}
    serving.register_version(generator.model_uri, params, run_id, metrics)
    return generator.model_id


def main() -> None:
    reproducibility.pin_threads()
    params = load_params()
    config = params.train
    manifest = read_json(MANIFEST_PATH, MANIFEST_FIELDS)
    vocab = load_vocab(VOCAB_PATH)
    device = resolve_device(config.device)
    train_tokens = to_device_tokens(load_tokens(TRAIN_TOKENS_PATH), device)
    val_tokens = to_device_tokens(load_tokens(VAL_TOKENS_PATH), device)
    check_block_size(config.block_size, len(train_tokens), len(val_tokens))
    train_counts = bigram_counts(train_tokens, len(vocab))
    val_counts = bigram_counts(val_tokens, len(vocab))
    datasets = split_datasets(params, manifest)

    torch.manual_seed(config.seed)
    model = BigramLanguageModel(len(vocab)).to(device)
    curve: list[dict] = []

    with (
        tracking.stage_run("train", params, run_name=tracking.run_name()) as run,
        # Ctrl-C or an error after the model is saved must not leave it without its run.json.
        outputs_removed_on_failure(MODEL_PATH, LOSS_CURVE_PATH, RUN_INFO_PATH),
    ):
        log_training_run_inputs(params, manifest, device, datasets)
        progress = tqdm(
            total=config.max_iters, desc="train", unit="step", disable=None, file=sys.stderr
        )

        def on_eval(step: int) -> None:
            train_loss, val_loss = exact_losses(model, train_counts, val_counts)
            curve.append({"step": step, "train_loss": train_loss, "val_loss": val_loss})
            if step < config.max_iters:  # The final losses are logged with the models below.
                log_losses(curve[-1], datasets)
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

        save_model(model, MODEL_PATH)
        with atomic_path(LOSS_CURVE_PATH) as tmp_path:
            pd.DataFrame(curve).to_csv(tmp_path, index=False)
        mlflow.log_artifact(str(LOSS_CURVE_PATH))
        mlflow.log_artifact(str(VOCAB_PATH))
        # Logged at the final step, with the final losses linked to them and to the datasets.
        with model_code() as code_paths:
            model_ids = [log_model(model, params, config.max_iters, code_paths)]
            model_ids.append(
                register_text_generator(
                    params, run.info.run_id, curve[-1], config.max_iters, code_paths
                )
            )
        for model_id in model_ids:
            log_losses(curve[-1], datasets, model_id)
        model_sha256 = file_sha256(MODEL_PATH)
        mlflow.set_tag(tracking.MODEL_TAG, model_sha256)
        runrecord.write_run_record(run.info.run_id, model_sha256)


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
