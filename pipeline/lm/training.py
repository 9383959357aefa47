"""The training loops, free of MLflow and file paths: what the train stage and the benchmarks run.

``train_minibatch`` is the lecture's loop: AdamW on random (batch_size, block_size) batches, for
either model. ``train_on_counts`` fits a bigram's table by full-batch L-BFGS on the bigram count
matrix, which is all its loss depends on. Both call ``on_eval(step)`` at every eval point, where
the caller computes a bigram's exact losses from the counts (``exact_losses``) or a GPT's
estimate from random batches (``estimated_losses``, the lecture's estimate_loss).

Everything a loop changes besides the model is in one ``TrainingState`` (the optimizer, the
generator of the batches, torch's global generator, the next step): a caller that saves it with
the model at an eval point, and passes it back in, continues the run exactly where it stopped
(pipeline.lm.checkpoints).

A minibatch step is the lecture's (``lecture_step``: batch, loss, zero_grad, backward, step)
or, for a bigram at a constant learning rate, one of two equivalents beside it, chosen in
``choose_step``: on the CPU the gradient of the batch's loss in closed form instead of by
backward() (``closed_form_step``); on a CUDA device the step captured once as a CUDA graph and
replayed (``CudaGraphStep``).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_loss_from_counts
from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.models import LanguageModel
from pipeline.lm.tokens import batch_at, get_batch
from pipeline.params import TrainParams

EvalCallback = Callable[[int], None]
TrainStep = Callable[[], None]
# Loss evaluations L-BFGS may spend per iteration, most of them in its line search.
LINE_SEARCH_EVALS = 25


@dataclass
class TrainingState:
    """What a run needs besides the model to go on exactly where it stopped: the optimizer
    (AdamW's moments, or L-BFGS's history), the generator that draws the batches, torch's
    global generator (dropout's masks) and the step to run next."""

    optimizer: torch.optim.Optimizer
    batches: torch.Generator
    step: int = 0
    # The model's DistributedDataParallel wrapper when several processes train
    # (pipeline.lm.distributed): a forward through it makes backward average the gradients of
    # every process. Not saved: a run is resumed in the processes it is given.
    ddp: torch.nn.Module | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.get_state(),
            "global_rng": torch.get_rng_state(),
        }
        if self.batches.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.batches.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.set_state(state["batches"])
        torch.set_rng_state(state["global_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.batches.device)


def new_training_state(
    model: LanguageModel, config: TrainParams, device: torch.device, cuda_graph: bool = True
) -> TrainingState:
    """A run's state at step 0: its optimizer by train.method, and the batches' generator
    seeded with train.seed."""
    if config.method == "counts":
        optimizer: torch.optim.Optimizer = lbfgs(model)
    else:
        # Fused: one kernel for the whole AdamW update instead of a dozen small ones per step.
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.lr,
            fused=True,
            capturable=uses_cuda_graph(model, config, device, cuda_graph),
        )
    return TrainingState(optimizer, torch.Generator(device=device).manual_seed(config.seed))


def lbfgs(model: LanguageModel) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(
        model.parameters(), lr=1.0, history_size=20, line_search_fn="strong_wolfe"
    )


def fit(
    model: LanguageModel,
    train_tokens: torch.Tensor,
    train_counts: torch.Tensor,
    config: TrainParams,
    on_eval: EvalCallback,
    progress: tqdm,
    state: TrainingState | None = None,
) -> None:
    """Train by config.method: the lecture's minibatch loop, or L-BFGS on the bigram counts;
    from ``state`` (a checkpoint's) when given, else from step 0."""
    if config.method == "counts":
        assert isinstance(model, BigramLanguageModel)  # params refuse counts for a GPT
        train_on_counts(model, train_counts, config, on_eval, progress, state)
    else:
        train_minibatch(model, train_tokens, config, on_eval, progress, state=state)


def train_minibatch(
    model: LanguageModel,
    train_tokens: torch.Tensor,
    config: TrainParams,
    on_eval: EvalCallback,
    progress: tqdm,
    cuda_graph: bool = True,
    state: TrainingState | None = None,
) -> None:
    """The lecture's loop: AdamW on random batches, one step at a time; on_eval(step) at each
    eval point. The step is the lecture's (lecture_step) or one of its faster equivalents,
    chosen by choose_step. ``state.step`` is kept at the step about to run, so that on_eval
    can save the state.

    The loss is never read back per step, so between eval points the device never waits for
    Python.
    """
    if state is None:
        state = new_training_state(model, config, train_tokens.device, cuda_graph)
    step = choose_step(model, train_tokens, config, state, cuda_graph)
    evals = set(evals_to_come(config, state))
    model.train()  # dropout on; on_eval may switch it off, and must switch it back
    progress.update(state.step)
    for iteration in range(state.step, config.max_iters):
        state.step = iteration
        if iteration in evals:
            on_eval(iteration)
        step()
        progress.update()
    state.step = config.max_iters
    on_eval(config.max_iters)


def evals_to_come(config: TrainParams, state: TrainingState) -> list[int]:
    """The eval points from state.step on. A run resumed from a checkpoint has evaluated the
    checkpoint's own step already: checkpoints are taken at eval points, after the eval."""
    return [
        step
        for step in eval_steps(config.max_iters, config.eval_interval)
        if step > state.step or step == 0
    ]


def lecture_step(
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    config: TrainParams,
    generator: torch.Generator,
    first_iteration: int = 0,
    ddp: torch.nn.Module | None = None,
) -> TrainStep:
    """The lecture's step: a random batch, its loss, zero_grad, backward, an optimizer step
    (at the learning rate train.lr_schedule gives the step). With ddp, the model's
    DistributedDataParallel wrapper, the loss is computed through it, so that backward averages
    the gradients of every process before the step."""
    iteration = first_iteration

    def step() -> None:
        nonlocal iteration
        if config.lr_schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(iteration, config)
        inputs, targets = get_batch(tokens, config.batch_size, config.block_size, generator)
        loss = model.batch_loss(inputs, targets) if ddp is None else ddp(inputs, targets)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1

    return step


def learning_rate(iteration: int, config: TrainParams) -> float:
    """train.lr, or under the cosine schedule: a linear warm-up over train.warmup_iters steps
    (Adam's moment estimates are noisy at first), then half a cosine from train.lr down to
    train.lr / 10 at the last step, as nanoGPT decays it."""
    if config.lr_schedule == "constant":
        return config.lr
    if iteration < config.warmup_iters:
        return config.lr * (iteration + 1) / (config.warmup_iters + 1)
    min_lr = config.lr / 10
    progress = (iteration - config.warmup_iters) / max(
        1, config.max_iters - 1 - config.warmup_iters
    )
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - min_lr)


def closed_form_step(
    model: BigramLanguageModel,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    config: TrainParams,
    generator: torch.Generator,
) -> TrainStep:
    """The lecture's step on a CPU, with the gradient of the batch's loss computed in closed
    form (BigramLanguageModel.batch_loss_gradient) instead of by autograd's forward and
    backward passes: the same numbers up to float rounding.

    A CPU step is bound by per-op overhead, so this runs 1.4x as many steps a second at V = 65
    and twice as many at V = 4096.
    """
    weights = model.token_embedding_table.weight

    def step() -> None:
        inputs, targets = get_batch(tokens, config.batch_size, config.block_size, generator)
        weights.grad = model.batch_loss_gradient(inputs, targets)  # zero_grad and backward
        optimizer.step()

    return step


def is_fast_bigram(model: LanguageModel, config: TrainParams) -> bool:
    """A bigram at a constant learning rate, the case the faster steps are made for."""
    return isinstance(model, BigramLanguageModel) and config.lr_schedule == "constant"


def uses_cuda_graph(
    model: LanguageModel, config: TrainParams, device: torch.device, cuda_graph: bool
) -> bool:
    return is_fast_bigram(model, config) and cuda_graph and device.type == "cuda"


def choose_step(
    model: LanguageModel,
    tokens: torch.Tensor,
    config: TrainParams,
    state: TrainingState,
    cuda_graph: bool,
) -> TrainStep:
    """The one place a step is chosen: for a bigram at a constant learning rate, closed form on
    a CPU and a replayed CUDA graph on CUDA (unless cuda_graph is False); the lecture's own step
    for a GPT and elsewhere (MPS, eager CUDA, a schedule, several processes). All draw the same
    batches from state's generator, seeded with train.seed."""
    device = tokens.device
    optimizer, generator = state.optimizer, state.batches
    if state.ddp is not None:  # The faster steps compute no gradient for DDP to average.
        return lecture_step(model, optimizer, tokens, config, generator, state.step, state.ddp)
    if uses_cuda_graph(model, config, device, cuda_graph):
        assert isinstance(model, BigramLanguageModel)
        return CudaGraphStep(model, optimizer, tokens, config, generator)
    if is_fast_bigram(model, config) and device.type == "cpu":
        assert isinstance(model, BigramLanguageModel)
        return closed_form_step(model, optimizer, tokens, config, generator)
    return lecture_step(model, optimizer, tokens, config, generator, state.step)


class CudaGraphStep:
    """The lecture's step captured once as a CUDA graph and replayed: one launch per step.

    A bigram step is a dozen tiny kernels, so launching them from Python costs more than
    running them. A graph replays fixed memory, so the batch starts are drawn into one reused
    buffer. As torch.cuda.graph requires, the first WARMUP_STEPS steps run eagerly on a side
    stream (they are real steps: the optimizer creates its state there); the next step is
    captured, with gradients set to None first so that backward allocates them from the graph's
    memory pool, and every later step replays the graph.
    """

    WARMUP_STEPS = 3

    def __init__(
        self,
        model: BigramLanguageModel,
        optimizer: torch.optim.Optimizer,
        tokens: torch.Tensor,
        config: TrainParams,
        generator: torch.Generator,
    ):
        self.model = model
        self.optimizer = optimizer
        self.tokens = tokens
        self.block_size = config.block_size
        self.generator = generator
        self.starts = torch.empty(config.batch_size, dtype=torch.long, device=tokens.device)
        self.steps_run = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def _loss_backward_update(self) -> None:
        inputs, targets = batch_at(self.tokens, self.starts, self.block_size)
        self.model.batch_loss(inputs, targets).backward()
        self.optimizer.step()

    def __call__(self) -> None:
        num_starts = len(self.tokens) - self.block_size
        torch.randint(
            num_starts,
            self.starts.shape,
            generator=self.generator,
            device=self.starts.device,
            out=self.starts,
        )
        if self.graph is not None:
            self.graph.replay()
        elif self.steps_run < self.WARMUP_STEPS:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream), warnings.catch_warnings():
                # capturable=True warns when a step runs uncaptured, as warm-up steps must.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self.optimizer.zero_grad(set_to_none=True)
                self._loss_backward_update()
            torch.cuda.current_stream().wait_stream(side_stream)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._loss_backward_update()
            self.graph.replay()  # Capturing records the step without running it.
        self.steps_run += 1


def train_on_counts(
    model: BigramLanguageModel,
    train_counts: torch.Tensor,
    config: TrainParams,
    on_eval: EvalCallback,
    progress: tqdm,
    state: TrainingState | None = None,
) -> None:
    """Full-batch L-BFGS on the exact train loss; max_iters bounds its iterations.

    One optimizer.step() runs the iterations between two eval points. L-BFGS stops early once
    the loss or the weights stop changing (its tolerance_change), which on Tiny Shakespeare
    takes a few hundred iterations, so later calls return almost at once.
    """
    weights = model.token_embedding_table.weight
    if state is None:
        state = TrainingState(lbfgs(model), torch.Generator(device=weights.device))
    optimizer = state.optimizer
    assert isinstance(optimizer, torch.optim.LBFGS)  # new_training_state's for counts
    counts = train_counts.to(weights.dtype)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = bigram_loss_from_counts(weights, counts)
        loss.backward()
        return loss

    evals = eval_steps(config.max_iters, config.eval_interval)
    to_come = evals_to_come(config, state)
    progress.update(state.step)
    for start, stop in zip(evals, evals[1:], strict=False):
        if stop <= state.step:
            continue
        state.step = start
        if start in to_come:
            on_eval(start)
        # max_eval bounds loss evaluations, line searches included: LBFGS's default (1.25 per
        # iteration) would stop a run of a few iterations in its first line search.
        optimizer.param_groups[0].update(
            max_iter=stop - start, max_eval=LINE_SEARCH_EVALS * (stop - start)
        )
        optimizer.step(closure)
        progress.update(stop - start)
    state.step = config.max_iters
    on_eval(config.max_iters)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit device that is missing is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            "param 'train.device' is 'cuda' but this machine has no CUDA device; "
            "use 'auto' or 'cpu'"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(
            "param 'train.device' is 'mps' but this machine has no MPS device; use 'auto' or 'cpu'"
        )
    return torch.device(name)


@torch.no_grad()
def exact_losses(
    model: BigramLanguageModel, train_counts: torch.Tensor, val_counts: torch.Tensor
) -> tuple[float, float]:
    """Mean loss over every bigram of each split: exact, not estimated from random batches."""
    weights = model.token_embedding_table.weight
    return (
        bigram_loss_from_counts(weights, train_counts).item(),
        bigram_loss_from_counts(weights, val_counts).item(),
    )


@torch.no_grad()
def estimated_losses(
    model: GPTLanguageModel,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    config: TrainParams,
) -> tuple[float, float]:
    """The lecture's estimate_loss: the mean loss of train.eval_iters random batches per split,
    in eval mode (no dropout). The batches come from their own generator, seeded with
    train.seed at every eval point, so the estimate draws nothing from the training's stream
    and every point of the curve is measured on the same batches."""
    was_training = model.training
    model.eval()
    try:
        losses = []
        for tokens in (train_tokens, val_tokens):
            generator = torch.Generator(device=tokens.device).manual_seed(config.seed)
            total = torch.zeros((), device=tokens.device)
            for _ in range(config.eval_iters):
                batch = get_batch(tokens, config.batch_size, config.block_size, generator)
                total += model.batch_loss(*batch)
            losses.append(total.item() / config.eval_iters)
        return losses[0], losses[1]
    finally:
        model.train(was_training)


def check_losses_finite(step: int, train_loss: float, val_loss: float, config: TrainParams) -> None:
    """Stop a run whose loss is no longer a number where it diverged, at its first eval point
    past it: a NaN model must not be saved, logged or registered, and NaN is not valid JSON."""
    if math.isfinite(train_loss) and math.isfinite(val_loss):
        return
    if config.method == "minibatch":
        fix = f"lower train.lr (now {config.lr:g}) and rerun"
    else:  # L-BFGS takes its own step size: a non-finite loss there is not a param's doing.
        fix = "train.method: counts does not use train.lr; try train.method: minibatch"
    raise PipelineError(
        f"training diverged: at step {step} the train loss is {train_loss} and the val loss "
        f"{val_loss}; {fix}; no model was saved or registered"
    )


# What a failed allocation looks like: CUDA's and MPS's errors, and the CPU allocator's
# RuntimeError (malloc failed, under a memory limit or with overcommit off).
OUT_OF_MEMORY_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "out of memory")
ALLOCATION_SIZE = re.compile(r"(?:tried to allocate|Tried to allocate) ([\d.]+ ?[A-Za-z]+)")


@contextlib.contextmanager
def out_of_memory_as_error(config: TrainParams) -> Iterator[None]:
    """An allocation that fails while training becomes one line naming the params that size
    it, instead of an allocator traceback. Other RuntimeErrors are bugs and stay as they are."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one.
        message = str(error)
        if not isinstance(error, torch.OutOfMemoryError) and not any(
            marker in message for marker in OUT_OF_MEMORY_MARKERS
        ):
            raise
        raise PipelineError(out_of_memory_message(message, config)) from None


def out_of_memory_message(message: str, config: TrainParams) -> str:
    size = ALLOCATION_SIZE.search(message)
    tried = f" (could not allocate {size.group(1)})" if size else ""
    if config.method == "minibatch":
        shrink = (
            f"lower train.batch_size or train.block_size (now {config.batch_size:,} x "
            f"{config.block_size:,} = {config.batch_size * config.block_size:,} tokens per batch)"
        )
    else:
        shrink = "use train.method: minibatch (L-BFGS keeps 20 V x V tables of history)"
    device = "" if config.device == "cpu" else ", or set train.device: cpu"
    return (
        f"out of memory while training{tried}: {shrink}, or train on a corpus with fewer "
        f"distinct characters (data.max_vocab_size bounds them){device}; no model was saved"
    )


def eval_steps(max_iters: int, eval_interval: int) -> list[int]:
    """The lecture evaluates every eval_interval steps from 0; we add the final step."""
    steps = list(range(0, max_iters, eval_interval))
    return steps + [max_iters]
