"""Training in several processes: PyTorch's launcher (torchrun) and DistributedDataParallel.

With ``train.processes: N`` above 1 the train stage hands itself to torchrun
(``python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.stages.train``),
which starts N copies of it with RANK, LOCAL_RANK and WORLD_SIZE set. Each copy builds the same
model from train.seed, wraps it in DistributedDataParallel and trains on batches of its own
(train.seed + rank draws them): DDP averages the N gradients in every backward pass, so one step
sees N x train.batch_size sequences, the effective batch, at train.lr. Rank 0 alone estimates the
losses, logs to MLflow and writes the outputs; the others only train.

gloo connects the processes on CPUs, NCCL on GPUs (one GPU per process: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
import sys
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


def relaunch_under_torchrun(processes: int) -> None:
    """Replace this process by torchrun running the train stage in ``processes`` processes.

    exec, not a child: DVC's signals (Ctrl-C, a kill) reach torchrun itself, which passes them
    on to every worker, and the stage's exit status is torchrun's.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        STAGE_MODULE,
    ]
    # torchrun warns on stderr when it sets this itself; pin_threads sets torch's count anyway.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


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
