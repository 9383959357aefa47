"""Stage 3, train: fit the bigram model and log it, with its loss curve, to MLflow.

``method: minibatch`` is the lecture's loop: AdamW on random (batch_size, block_size) batches.
``method: counts`` fits the same table by full-batch L-BFGS on the bigram count matrix, which is
all the loss depends on. At every eval point the exact loss over the whole train and val splits
is computed from their bigram counts (O(V^2)), instead of the lecture's estimate from 200
random batches; the loss is read back from the device only there, never per step.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from tqdm import tqdm

from pipeline import reproducibility, tracking
from pipeline.data import batch_at, bigram_counts, load_tokens, load_vocab, to_device_tokens
from pipeline.errors import PipelineError, stage_entry_point
from pipeline.files import atomic_path, outputs_removed_on_failure, read_json, write_json
from pipeline.model import BigramLanguageModel, bigram_loss_from_counts
from pipeline.params import Params, TrainParams, load_params
from pipeline.vocab import MANIFEST_PATH, TRAIN_TOKENS_PATH, VAL_TOKENS_PATH, VOCAB_PATH

TRAIN_DIR = Path("data/train")
MODEL_PATH = TRAIN_DIR / "model.pt"
LOSS_CURVE_PATH = TRAIN_DIR / "loss_curve.csv"
RUN_INFO_PATH = TRAIN_DIR / "run.json"
MODEL_ARTIFACT = "model"

EvalCallback = Callable[[int], None]
# Loss evaluations L-BFGS may spend per iteration, most of them in its line search.
LINE_SEARCH_EVALS = 25


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


def check_block_size(block_size: int, num_train: int, num_val: int) -> None:
    shortest = min(num_train, num_val)
    if block_size >= shortest:
        raise PipelineError(
            f"param 'train.block_size' must be shorter than the smaller split ({shortest} tokens), "
            f"got {block_size}; lower it or use a longer corpus"
        )


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


def eval_steps(max_iters: int, eval_interval: int) -> list[int]:
    """The lecture evaluates every eval_interval steps from 0; we add the final step."""
    steps = list(range(0, max_iters, eval_interval))
    return steps + [max_iters]


def train_minibatch(
    model: BigramLanguageModel,
    train_tokens: torch.Tensor,
    config: TrainParams,
    on_eval: EvalCallback,
    progress: tqdm,
) -> None:
    """The lecture's loop: AdamW on random batches; on_eval(step) at each eval point.

    Batch starts are drawn on the tokens' device into one reused buffer and the loss is never
    read back per step, so between eval points the device never waits for Python.
    """
    device = train_tokens.device
    use_cuda_graph = device.type == "cuda"
    # Fused: one kernel for the whole AdamW update instead of a dozen small ones per step.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, fused=True, capturable=use_cuda_graph
    )
    generator = torch.Generator(device=device).manual_seed(config.seed)
    starts = torch.empty(config.batch_size, dtype=torch.long, device=device)
    num_starts = len(train_tokens) - config.block_size

    def forward_backward_update() -> None:
        inputs, targets = batch_at(train_tokens, starts, config.block_size)
        model.batch_loss(inputs, targets).backward()
        optimizer.step()

    if use_cuda_graph:
        train_step = CudaGraphStep(forward_backward_update, optimizer)
    else:

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            forward_backward_update()

    evals = set(eval_steps(config.max_iters, config.eval_interval))
    for step in range(config.max_iters):
        if step in evals:
            on_eval(step)
        torch.randint(num_starts, starts.shape, generator=generator, device=device, out=starts)
        train_step()
        progress.update()
    on_eval(config.max_iters)


class CudaGraphStep:
    """A training step captured once as a CUDA graph and replayed: one launch per step.

    A bigram step is a dozen tiny kernels, so launching them from Python costs more than
    running them. As torch.cuda.graph requires, the first WARMUP_STEPS steps run eagerly on a
    side stream (they are real steps: the optimizer creates its state there); the next step
    is captured, with gradients set to None first so that backward allocates them from the
    graph's memory pool, and every later step replays the graph.
    """

    WARMUP_STEPS = 3

    def __init__(
        self, forward_backward_update: Callable[[], None], optimizer: torch.optim.Optimizer
    ):
        self.forward_backward_update = forward_backward_update
        self.optimizer = optimizer
        self.steps_run = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.steps_run < self.WARMUP_STEPS:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream), warnings.catch_warnings():
                # capturable=True warns when a step runs uncaptured, as warm-up steps must.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self.optimizer.zero_grad(set_to_none=True)
                self.forward_backward_update()
            torch.cuda.current_stream().wait_stream(side_stream)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.forward_backward_update()
            self.graph.replay()  # Capturing records the step without running it.
        self.steps_run += 1


def train_on_counts(
    model: BigramLanguageModel,
    train_counts: torch.Tensor,
    config: TrainParams,
    on_eval: EvalCallback,
    progress: tqdm,
) -> None:
    """Full-batch L-BFGS on the exact train loss; max_iters bounds its iterations.

    One optimizer.step() runs the iterations between two eval points. L-BFGS stops early once
    the loss or the weights stop changing (its tolerance_change), which on Tiny Shakespeare
    takes a few hundred iterations, so later calls return almost at once.
    """
    weights = model.token_embedding_table.weight
    optimizer = torch.optim.LBFGS([weights], lr=1.0, history_size=20, line_search_fn="strong_wolfe")
    counts = train_counts.to(weights.dtype)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = bigram_loss_from_counts(weights, counts)
        loss.backward()
        return loss

    evals = eval_steps(config.max_iters, config.eval_interval)
    for start, stop in zip(evals, evals[1:], strict=False):
        on_eval(start)
        # max_eval bounds loss evaluations, line searches included: LBFGS's default (1.25 per
        # iteration) would stop a run of a few iterations in its first line search.
        optimizer.param_groups[0].update(
            max_iter=stop - start, max_eval=LINE_SEARCH_EVALS * (stop - start)
        )
        optimizer.step(closure)
        progress.update(stop - start)
    on_eval(config.max_iters)


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
        name=params.data.name,
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
    stage_entry_point(main)()
