"""The bigram language model of Karpathy's "Let's build GPT" lecture (bigram.py).

Each token id looks up a row of a V x V table that holds the logits of the next token:
the model sees only the current character.
"""

from __future__ import annotations

import bisect
import io
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import write_bytes


class BigramLanguageModel(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx and targets are (B, T) token ids; returns logits (B, T, V) and the mean loss."""
        logits = self.token_embedding_table(idx)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, self.vocab_size), targets.reshape(-1))
        return logits, loss

    def batch_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """forward()'s mean loss on a (B, T) batch, in fewer and smaller ops (for training).

        Row i of log_softmax(table) holds the log-probability of each token after token i, so
        the loss is the mean of -log_probs[inputs, targets]: one log-softmax over the V x V table
        instead of one per batch position. A training step is bound by per-op overhead.
        """
        log_probs = F.log_softmax(self.token_embedding_table.weight, dim=-1)
        # take() on flat (current, next) ids: the cheapest gather, and it syncs no host on CUDA.
        return -log_probs.take(inputs * self.vocab_size + targets).mean()

    @torch.no_grad()
    def batch_loss_gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The gradient of batch_loss with respect to the table, in closed form.

        batch_loss is the mean of -log softmax(W)[i, j] over the batch's N (current i, next j)
        pairs. With n_ij the number of times pair (i, j) occurs in the batch and n_i = sum_j n_ij,
        its gradient is (n_i * softmax(W)[i, j] - n_ij) / N: the numbers autograd computes, up to
        float rounding, in a handful of ops instead of a forward and a backward pass.
        """
        weights = self.token_embedding_table.weight
        row_counts = torch.bincount(inputs.view(-1), minlength=self.vocab_size)
        gradient = F.softmax(weights, dim=-1).mul_(row_counts.to(weights.dtype).unsqueeze(1))
        # -1 at each of the batch's pairs, added up where a pair repeats: the -n_ij.
        pair_ids = (inputs * self.vocab_size + targets).view(-1)
        minus_ones = torch.tensor(-1.0, dtype=weights.dtype, device=weights.device)
        gradient.view(-1).index_put_((pair_ids,), minus_ones.expand(len(pair_ids)), accumulate=True)
        return gradient.div_(len(pair_ids))

    def next_token_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """The (V, V) table P[current, next]: softmax of each row of logits."""
        return F.softmax(self.token_embedding_table.weight / temperature, dim=-1)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        top_k: int = 0,
    ) -> torch.Tensor:
        """Extend each row of idx (B, T) by max_new_tokens sampled tokens; returns (B, T + n).
        With top_k > 0 each draw is among the top_k most likely next tokens only.

        The next token depends only on the last one, so the cumulative probability table is
        computed once and each draw is a binary search of the current token's row at a
        uniform random number: O(n), where feeding the whole growing sequence back (as the
        lecture's generate does) is O(n^2). The draws run in plain Python over lists, as one
        tensor op per step costs more than the whole draw at this size (V = 65).
        """
        probs = self.next_token_probs(temperature).double()
        if 0 < top_k < self.vocab_size:
            kept = torch.zeros_like(probs, dtype=torch.bool)
            kept.scatter_(1, probs.topk(top_k, dim=-1).indices, True)
            probs = probs.where(kept, 0.0)  # each draw below scales to its row's total
        cumulative = probs.cumsum(dim=-1).tolist()
        device = generator.device if generator is not None else torch.device("cpu")
        uniforms = torch.rand(
            idx.shape[0], max_new_tokens, generator=generator, device=device, dtype=torch.float64
        )
        last_token = self.vocab_size - 1
        new_tokens = []
        for current, row_uniforms in zip(idx[:, -1].tolist(), uniforms.tolist(), strict=True):
            sampled = []
            for uniform in row_uniforms:
                row = cumulative[current]
                # row[-1] is 1 up to rounding; scaling by it keeps every draw inside the row.
                current = min(bisect.bisect_right(row, uniform * row[-1]), last_token)
                sampled.append(current)
            new_tokens.append(sampled)
        sampled_tensor = torch.tensor(new_tokens, dtype=idx.dtype, device=idx.device)
        return torch.cat([idx, sampled_tensor.view(idx.shape[0], max_new_tokens)], dim=1)


def save_model(model: BigramLanguageModel, path: Path) -> None:
    """Save the weights so that the same weights always give the same bytes.

    torch.save writes the name of the file it saves to into the zip archive's entry names; saved
    to a buffer, every entry is named ``archive/...``, then the bytes are written atomically.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(path, buffer.getvalue())


def load_model(path: Path, vocab_size: int) -> BigramLanguageModel:
    """Load weights saved by the train stage (a state dict), checking they fit this vocabulary.

    Every model file is read through load_tensors, so no model file runs code.
    """
    state = load_tensors(path)
    weights = state.get("token_embedding_table.weight") if isinstance(state, dict) else None
    return model_from_weights(path, weights, vocab_size)


def load_logged_module(path: Path, vocab_size: int) -> BigramLanguageModel:
    """The weights of a whole model pickled by ``mlflow.pytorch.log_model`` (``data/model.pth``),
    read without running the pickle.

    Unpickled as MLflow does, the file would rebuild the module by calling whatever it names:
    any code. Here torch's tensors-only unpickler reads it, with the two classes such a file
    names mapped to inert stand-ins that only keep the attributes they are given; the table is
    taken from them and put into a fresh model, so nothing of the file's but tensors is used.
    """
    with torch.serialization.safe_globals(_PICKLED_MODULE_STAND_INS):
        module = load_tensors(path)
    return model_from_weights(path, _pickled_table(module), vocab_size)


class _PickledAttributes:
    """Stands in for a class a pickled module names: calling or rebuilding it runs no code but
    keeping the attributes the file holds (only values torch's unpickler allows)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


class _PickledBigramModel(_PickledAttributes):
    pass


class _PickledEmbedding(_PickledAttributes):
    pass


_PICKLED_MODULE_STAND_INS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    (_PickledBigramModel, f"{BigramLanguageModel.__module__}.{BigramLanguageModel.__name__}"),
    (_PickledEmbedding, f"{nn.Embedding.__module__}.{nn.Embedding.__name__}"),
]


def _pickled_table(module: object) -> torch.Tensor | None:
    """The embedding table of an unpickled stand-in, or None where the file holds none."""
    if not isinstance(module, _PickledBigramModel):
        return None
    submodules = vars(module).get("_modules")
    table = submodules.get("token_embedding_table") if isinstance(submodules, dict) else None
    parameters = vars(table).get("_parameters") if isinstance(table, _PickledEmbedding) else None
    weights = parameters.get("weight") if isinstance(parameters, dict) else None
    return weights if isinstance(weights, torch.Tensor) else None


def load_tensors(path: Path) -> object:
    """torch.load with only tensors and plain containers allowed (``weights_only``), so a
    crafted pickle is refused before it can run anything; every refusal is one line."""
    if not path.exists():
        raise PipelineError(f"{path} is missing: run `dvc repro train`")
    if not path.is_file():
        # A FIFO or a device would block or never end.
        raise PipelineError(f"{path} is not a regular file: rerun `dvc repro train`")
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol it did not write before refusing the file.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise PipelineError(
            f"{path} is refused: it is a pickle that holds more than tensors "
            f"({_unpickler_reason(str(error))}), and loading it could run code; load only "
            "model files this pipeline wrote (`dvc repro train` writes data/train/model.pt)"
        ) from None
    except Exception as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise PipelineError(
            f"{path} is not a saved model ({reason}); rerun `dvc repro train`"
        ) from None


def _unpickler_reason(message: str) -> str:
    """The one line of torch's many-line refusal that says what the file wanted."""
    wanted = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if wanted:
        return f"it names {wanted.group(1)}"
    detail = message.partition("WeightsUnpickler error:")[2].strip()
    return detail.splitlines()[0] if detail else "not a tensors-only file"


def model_from_weights(
    path: Path, weights: torch.Tensor | None, vocab_size: int
) -> BigramLanguageModel:
    """A fresh model holding weights, which must be the table of this vocabulary."""
    if weights is None:
        raise PipelineError(f"{path} holds no bigram embedding table: rerun `dvc repro train`")
    expected = (vocab_size, vocab_size)
    if tuple(weights.shape) != expected:
        raise PipelineError(
            f"{path} has an embedding table of shape {tuple(weights.shape)} but the vocabulary "
            f"needs {expected}: the model was trained on another vocabulary; rerun `dvc repro`"
        )
    if not weights.is_floating_point():
        raise PipelineError(
            f"{path} holds an embedding table of {weights.dtype}, not floats: rerun `dvc repro "
            "train`"
        )
    model = BigramLanguageModel(vocab_size)
    model.load_state_dict({"token_embedding_table.weight": weights})
    return model
