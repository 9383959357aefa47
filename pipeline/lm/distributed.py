"""Training in several processes: PyTorch's launcher (torchrun) and DistributedDataParallel.

With ``train.processes: N`` above 1 the train stage starts torchrun's launcher, as
``torchrun --standalone --nproc-per-node N -m pipeline.stages.train`` would, which starts N copies
of the stage with RANK, LOCAL_RANK and WORLD_SIZE set. Each copy builds the same
model from train.seed, wraps it in DistributedDataParallel and trains on batches of its own
(train.seed + rank draws them): DDP averages the N gradients in every backward pass, so one step
sees N x train.batch_size sequences, the effective batch, at train.lr. Rank 0 alone estimates the
losses, logs to MLflow and writes the outputs; the others only train.

gloo connects the processes on CPUs, NCCL on GPUs (one GPU per process: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.lm.models import LanguageModel

STAGE_MODULE = "pipeline.stages.train"


@dataclass(frozen=True)
class World:
    """This process's place among the ones torchrun started."""

    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes outputs."""
        return self.rank == 0


def world_from_env() -> World | None:
    """The world torchrun describes in the environment, or None in a plain process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return World(
        int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    )


def launch(processes: int) -> None:
    """Run the train stage in ``processes`` processes with torchrun's launcher (its Python API,
    as `torchrun --standalone` sets it up), and return when all have ended.

    Each process prints its own errors in one line, as any stage does; the launcher's report of
    a failed process (a traceback of its own) is left out, and a process killed by a signal,
    which printed nothing, is named in one line instead. The launcher passes Ctrl-C and SIGTERM
    on to every process.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # The launcher warns when it sets this itself; each process's pin_threads sets torch's.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    sys.stdout.flush()
    try:
        elastic_launch(config, sys.executable)("-u", "-m", STAGE_MODULE)
    except ChildFailedError as error:
        # A process killed by a signal first: the others then fail or stop because it is gone.
        signalled = [(r, f) for r, f in error.failures.items() if f.exitcode < 0]
        rank, failure = signalled[0] if signalled else error.get_first_failure()
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            raise PipelineError(
                f"training process {rank} of {processes} was killed by {name}; "
                "no partial output was left, rerun the stage"
            ) from None
        raise TrainingProcessFailed(failure.exitcode) from None


class TrainingProcessFailed(Exception):
    """A training process failed and said why; the stage exits with its status."""

    def __init__(self, exitcode: int) -> None:
        super().__init__(exitcode)
        self.exitcode = exitcode


# What gloo and NCCL say when the process at the other end of an exchange is gone.
PEER_GONE = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "remote process exited",
)


def peer_ended(error: BaseException) -> bool:
    """Whether error is a gradient exchange (or barrier) that failed because another process of
    the launch ended: the launcher reports that process, so this one has nothing to add."""
    return isinstance(error, RuntimeError) and any(gone in str(error) for gone in PEER_GONE)


def check_world(world: World, processes: int) -> None:
    if world.size != processes:
        raise PipelineError(
            f"torchrun started {world.size} processes but param 'train.processes' is "
            f"{processes}; set train.processes to {world.size}, or run the stage with "
            "`python -m pipeline.stages.train` and let it start torchrun"
        )


def device_of(world: World, device: torch.device) -> torch.device:
    """One GPU per process, by its rank on this machine; CPU processes share the CPU."""
    import torch

    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def join(world: World, model: LanguageModel, device: torch.device) -> DistributedDataParallel:
    """Connect to the other processes (gloo on a CPU, NCCL on GPUs) and wrap the model, whose
    parameters DDP makes rank 0's in every process."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def leave() -> None:
    """Wait until every process, rank 0 with its outputs included, is done; then disconnect."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
