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

Checkpoints: at every train.checkpoint_every-th eval point the run's whole state is saved to
checkpoints/ (pipeline.lm.checkpoints) and its weights logged as a logged model of the run. A
stage killed in any way, SIGKILL included, resumes from its last checkpoint at the next
`dvc repro` or `dvc exp run` of the same params, data and code, and ends with the same bytes.
The folder is outside the stage's outs on purpose: DVC deletes outs before it reruns a stage
and caches every version of them, so a checkpoint there would be gone when it is needed, or
fill the cache. A completed training deletes its checkpoint. train.keep: best outputs the
weights of the eval point with the lowest val loss instead of the last step's.

MLflow's system metrics (CPU, memory, disk, network, GPUs) are sampled throughout the run at an
interval paced to its length (pipeline.tracking.system_metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from tqdm import tqdm

from pipeline.cli import ignore_interrupt_signals, stage_entry_point
from pipeline.determinism import pin_threads
from pipeline.errors import PeerProcessEnded
from pipeline.files import atomic_path, file_sha256, outputs_removed_on_failure, read_json
from pipeline.lm import distributed
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.checkpoints import Best, Checkpoint, fingerprint, load_checkpoint, save_checkpoint
from pipeline.lm.counts import bigram_counts
from pipeline.lm.models import LanguageModel, new_model, save_model
from pipeline.lm.sizes import check_model_fits, machine_memory_bytes
from pipeline.lm.tokens import load_encoded_corpus, to_device_tokens
from pipeline.lm.training import (
    TrainingState,
    check_losses_finite,
    estimated_losses,
    exact_losses,
    fit,
    new_training_state,
    out_of_memory_as_error,
    resolve_device,
)
from pipeline.params import Params, TrainParams, check_block_size, load_params
from pipeline.paths import (
    CHECKPOINT_DIR,
    LOSS_CURVE_PATH,
    MANIFEST_FIELDS,
    MANIFEST_PATH,
    MODEL_PATH,
    RUN_INFO_PATH,
    TRAIN_TOKENS_PATH,
    VAL_TOKENS_PATH,
    VOCAB_PATH,
)
from pipeline.tracking import checkpoints, lineage, rebuild, run_record, runs
from pipeline.tracking.system_metrics import system_metrics


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


@dataclass
class Progress:
    """What the eval points have given so far: the curve and the best point. A resumed run
    starts from its checkpoint's."""

    curve: list[dict] = field(default_factory=list)
    best: Best = field(default_factory=Best)


def checkpoint_fingerprint(params: Params, device: torch.device) -> str:
    """What a checkpoint must have been made from to be resumed: every param that changes the
    trajectory, the device type, and the md5 of every dep of the train stage (data and code,
    as dvc.lock records them). train.checkpoint_every and train.keep change no step."""
    train = {
        name: value
        for name, value in vars(params.train).items()
        if name not in ("checkpoint_every", "keep", "device")
    }
    return fingerprint(
        {
            "data": vars(params.data),
            "model": vars(params.model),
            "train": train,
            "device": device.type,
            "deps": rebuild.stage_dep_hashes(),
            "torch": torch.__version__,
        }
    )


def checkpoint_file(checkpoint_id: str) -> Path:
    return CHECKPOINT_DIR / f"train-{checkpoint_id[:16]}.pt"


def resume_from(path: Path, checkpoint_id: str) -> Checkpoint | None:
    """The checkpoint to resume from, if one of the same fingerprint is there. One that does
    not load is reported and ignored: training from step 0 gives the same model."""
    try:
        return load_checkpoint(path, checkpoint_id)
    except ValueError as error:
        print(
            f"warning: ignoring the checkpoint {path}: {error}; training from step 0",
            file=sys.stderr,
        )
        return None


def restore(
    resumed: Checkpoint | None, path: Path, model: LanguageModel, state: TrainingState
) -> Progress:
    """Where training starts: a checkpoint's model, optimizer and batch RNG, curve and best
    point, loaded into model and state; with no checkpoint, step 0."""
    if resumed is None:
        return Progress()
    model.load_state_dict(resumed.model)
    state.load_state_dict(resumed.training)
    print(f"resuming from {path}: step {resumed.step} of run {resumed.run_id}")
    return Progress(resumed.curve, resumed.best)


def is_checkpoint_due(step: int, config: TrainParams) -> bool:
    """At every checkpoint_every-th eval point, but neither at step 0 (nothing to resume) nor
    at the last step (the model is the stage's output then)."""
    every = config.checkpoint_every * config.eval_interval
    return every > 0 and 0 < step < config.max_iters and step % every == 0


def train_model(
    model: LanguageModel,
    splits: dict[str, torch.Tensor],
    config: TrainParams,
    datasets: dict,
    state: TrainingState,
    progress: Progress,
    save_state: Callable[[Progress], None],
    pace: Callable[[float], None],
) -> None:
    """Fit the model from state; at every eval point log its losses, when a checkpoint is due
    save it (save_state) and log its weights with the losses, and tell pace the fraction of
    this process's steps done."""
    bar = tqdm(total=config.max_iters, desc="train", unit="step", disable=None, file=sys.stderr)
    first_step = state.step

    def on_eval(step: int) -> None:
        train_loss, val_loss = losses_at_eval_point(model, splits, config)
        check_losses_finite(step, train_loss, val_loss, config)
        point = {"step": step, "train_loss": train_loss, "val_loss": val_loss}
        progress.curve.append(point)
        progress.best.update(step, val_loss, model)
        if is_checkpoint_due(step, config):
            save_state(progress)
            checkpoints.log_checkpoint(model, point, datasets)
        else:
            lineage.log_losses(point, datasets)
        if step > first_step:
            pace((step - first_step) / (config.max_iters - first_step))
        tqdm.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")

    fit(model, splits["train_tokens"], splits["train_counts"], config, on_eval, bar, state)
    bar.close()


def keep_model(model: LanguageModel, progress: Progress, config: TrainParams) -> None:
    """train.keep: best puts the weights of the lowest val loss into the model to output."""
    if config.keep == "best":
        model.load_state_dict(progress.best.weights)
        mlflow.set_tag(checkpoints.KEPT_STEP_TAG, str(progress.best.step))
        print(
            f"keeping step {progress.best.step}, the lowest val loss "
            f"({progress.best.val_loss:.4f}; train.keep: best)"
        )


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
    world = distributed.world_from_env()
    if world is None and params.train.processes > 1:
        # Bad input fails here in one line, before any process starts.
        load_checked_inputs(params, resolve_device(params.train.device))
        try:
            distributed.launch(params.train.processes)
        except distributed.TrainingProcessFailed as failed:
            sys.exit(failed.exitcode)
        return
    if world is not None:
        distributed.check_world(world, params.train.processes)
    pin_threads(params.train.threads)
    # A failed allocation anywhere in training (counts, batches, optimizer state) is one line.
    with out_of_memory_as_error(params.train):
        train_and_log(params, world)
    if world is not None:
        with stopped_when_a_peer_ends(world):
            distributed.leave()


@contextlib.contextmanager
def stopped_when_a_peer_ends(world: distributed.World | None) -> Iterator[None]:
    """Under torchrun, a process killed mid-step (SIGKILL, out of memory) makes the others'
    gradient exchange fail before the launcher's SIGTERM reaches them: they stop as that signal
    would stop them, without a traceback, and the launcher names the process that ended."""
    try:
        yield
    except RuntimeError as error:
        if world is None or not distributed.peer_ended(error):
            raise
        ignore_interrupt_signals()  # The launcher's SIGTERM must not cut the clean-up short.
        raise PeerProcessEnded() from None


def load_checked_inputs(
    params: Params, device: torch.device
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The vocabulary and the splits on the device, once the context and the model are known to
    fit them."""
    vocab, splits = load_splits(device, params.data.max_vocab_size)
    config = params.train
    check_block_size(config.block_size, len(splits["train_tokens"]), len(splits["val_tokens"]))
    check_model_fits(params, len(vocab), *device_memory(device))
    return vocab, splits


def train_replica(
    model: LanguageModel, splits: dict[str, torch.Tensor], config: TrainParams, state: TrainingState
) -> None:
    """A process of rank 1 and up: it trains, and leaves the losses, MLflow and the outputs to
    rank 0."""
    fit(
        model,
        splits["train_tokens"],
        splits["train_counts"],
        config,
        lambda step: None,
        tqdm(disable=True),
        state,
    )


def train_and_log(params: Params, world: distributed.World | None = None) -> None:
    config = params.train
    corpus_sha256 = read_json(MANIFEST_PATH, MANIFEST_FIELDS)["corpus_sha256"]
    device = resolve_device(config.device)
    if world is not None:
        device = distributed.device_of(world, device)
    vocab, splits = load_checked_inputs(params, device)
    datasets = lineage.training_datasets(params, corpus_sha256)
    torch.manual_seed(config.seed)
    model = new_model(params, len(vocab)).to(device)
    state = new_training_state(model, config, device)
    if world is not None:
        # The same model everywhere; batches and dropout masks of each process's own.
        state.ddp = distributed.join(world, model, device)
        state.batches.manual_seed(config.seed + world.rank)
        torch.manual_seed(config.seed + world.rank)
        if not world.is_main:
            with stopped_when_a_peer_ends(world):
                train_replica(model, splits, config, state)
            return
        # A checkpoint would need every process's batches and RNG: none under torchrun.
        config = dataclasses.replace(config, checkpoint_every=0)
        print(
            f"training in {world.size} processes (torchrun, DDP on {device.type}): "
            f"{world.size} x {config.batch_size} sequences a step"
        )
    checkpoint_id = checkpoint_fingerprint(params, device)
    path = checkpoint_file(checkpoint_id)
    resumed = resume_from(path, checkpoint_id) if config.checkpoint_every else None
    progress = restore(resumed, path, model, state)
    note = loss_curve_note(model, config)
    if resumed is not None:
        note += f"\n\nResumed from step {resumed.step} of run {resumed.run_id} ({path})."

    with (
        runs.stage_run(
            "train",
            params,
            run_name=runs.run_name(params),
            tags=checkpoints.resumed_tags(resumed.run_id, resumed.step) if resumed else None,
        ) as run,
        system_metrics(run.info.run_id) as pace,
        # Ctrl-C or an error after the model is saved must not leave it without its run.json.
        outputs_removed_on_failure(MODEL_PATH, LOSS_CURVE_PATH, RUN_INFO_PATH),
    ):
        run_tags = {"device": str(device), MLFLOW_RUN_NOTE: note, **rebuild.record(device)}
        lineage.log_training_inputs(params, corpus_sha256, run_tags, datasets)
        for point in progress.curve:  # The resumed run's curve starts at step 0 too.
            lineage.log_losses(point, datasets)

        def save_state(progress: Progress) -> None:
            save_checkpoint(
                path, checkpoint_id, run.info.run_id, model, state, progress.curve, progress.best
            )

        with stopped_when_a_peer_ends(world):
            train_model(model, splits, config, datasets, state, progress, save_state, pace)
        keep_model(model, progress, config)
        save_outputs(model, progress.curve)
        model_sha256 = file_sha256(MODEL_PATH)
        mlflow.set_tag(lineage.MODEL_TAG, model_sha256)
        run_record.write_run_record(run.info.run_id, model_sha256)
    path.unlink(missing_ok=True)  # The training completed: nothing to resume.


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
