"""Token files, batches and bigram counts shared by the train, evaluate and sample stages."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.files import read_json


def load_vocab(path: Path) -> list[str]:
    chars = read_json(path)["chars"]
    return list(chars)


def load_tokens(path: Path) -> np.ndarray:
    """Memory-map a token file written by the vocab stage (a .npy of small unsigned ints)."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro vocab` to rebuild it") from None
    except ValueError as error:
        raise PipelineError(f"{path} is not a token file ({error}): rerun `dvc repro`") from None


def to_device_tokens(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    # int64 because embedding lookups and fancy indexing take long indices.
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)


def get_batch(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) inputs and their next-token targets, drawn on the tokens' device.

    One gather of (B, T+1) windows replaces a Python loop over batch rows.
    """
    starts = torch.randint(
        len(tokens) - block_size, (batch_size,), device=tokens.device, generator=generator
    )
    offsets = torch.arange(block_size + 1, device=tokens.device)
    windows = tokens[starts.unsqueeze(1) + offsets]
    return windows[:, :-1], windows[:, 1:]


def bigram_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V, V) float matrix: counts[i, j] = how often token j follows token i."""
    pair_ids = tokens[:-1] * vocab_size + tokens[1:]
    counts = torch.bincount(pair_ids, minlength=vocab_size * vocab_size)
    return counts.view(vocab_size, vocab_size).to(torch.float64)


def conditional_entropy(counts: torch.Tensor) -> float:
    """H(next | current) in nats: the lowest mean loss any bigram model reaches on these counts."""
    row_totals = counts.sum(dim=1, keepdim=True)
    probs = counts / row_totals.clamp(min=1)
    nonzero = counts > 0
    return float(-(counts[nonzero] * probs[nonzero].log()).sum() / counts.sum())


def smoothed_probs(counts: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha (Laplace) smoothed next-token probabilities, as in the makemore lecture."""
    smoothed = counts + alpha
    return smoothed / smoothed.sum(dim=1, keepdim=True)


def uniform_loss(vocab_size: int) -> float:
    """Loss of a uniform guess over the vocabulary: ln(V) = 4.1744 for V = 65."""
    return math.log(vocab_size)
