"""The GPU check's part for several processes: what the train stage runs under torchrun, on every
GPU of the machine.

The lent GPU machine has neither MLflow nor DVC, so the train stage itself cannot run there. This
runs what each of its processes runs (pipeline.lm.distributed.join, then the lecture's step
through DistributedDataParallel in train_minibatch) under torchrun's launcher, one process per
GPU joined by NCCL, and reports the tokens/s of all processes together and rank 0's estimated
val loss at the end. On a CPU the processes join by gloo, which is how a test runs it at a tiny
size.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from tqdm import tqdm

from benchmarks.measure import Row
from benchmarks.workload import Workload, load_workload
from pipeline.lm import distributed
from pipeline.lm.gpt import GPTConfig, GPTLanguageModel
from pipeline.lm.training import estimated_losses, new_training_state, train_minibatch
from pipeline.params import TrainParams


# record: a process that raises writes its traceback where the launcher reads it, so that the
# error names the cause instead of "exitcode: 1".
@record
def train_one_process(
    corpus: Path, config: GPTConfig, train: TrainParams, device_type: str
) -> tuple[float, float]:
    """One process of the launch: (seconds of training, rank 0's val estimate after it)."""
    world = distributed.world_from_env()
    assert world is not None, "run under torchrun's launcher"
    device = distributed.device_of(world, torch.device(device_type))
    work = load_workload(corpus)
    tokens, val_tokens = work.train_tokens.to(device), work.val_tokens.to(device)
    torch.manual_seed(train.seed)
    model = GPTLanguageModel(config).to(device)
    state = new_training_state(model, train, device)
    state.ddp = distributed.join(world, model, device)
    state.batches.manual_seed(train.seed + world.rank)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    train_minibatch(model, tokens, train, lambda step: None, tqdm(disable=True), state=state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    val = estimated_losses(model, tokens, val_tokens, train)[1] if world.is_main else float("nan")
    distributed.leave()
    return seconds, val


def ddp_rows(
    work: Workload,
    config: GPTConfig,
    train: TrainParams,
    device_type: str,
    processes: int,
    steps: int,
) -> list[Row]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run = dataclasses.replace(train, max_iters=steps, eval_interval=steps)
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        results = elastic_launch(launch, train_one_process)(work.corpus, config, run, device_type)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        # What @record wrote: {"message": "ValueError: ...", "extraInfo": {"py_callstack": ...}}.
        cause = failure.message.get("message") if isinstance(failure.message, dict) else None
        raise RuntimeError(
            f"DDP process {rank} of {processes} failed (exit {failure.exitcode}): "
            f"{cause or failure.message or 'no error recorded'}"
        ) from None
    seconds, val = results[0]
    tokens_per_s = processes * train.batch_size * train.block_size * steps / seconds
    backend = "NCCL" if device_type == "cuda" else "gloo"
    return [
        Row(
            "GPU DDP" if device_type == "cuda" else "DDP",
            f"{processes} process(es), {backend}, DDP: tokens/s of all, {steps} steps of "
            f"{processes} x {train.batch_size} x {train.block_size}; rank 0's val estimate",
            "",
            f"{tokens_per_s:,.0f} tokens/s; val {val:.4f}",
        )
    ]
