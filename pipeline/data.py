"""Token files, batches and bigram counts shared by the train, evaluate and sample stages."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.files import read_json

# Tokens per bincount in bigram_counts: 4M tokens make 16 MB of int32 pair ids.
COUNT_CHUNK_TOKENS = 1 << 22


def load_vocab(path: Path) -> list[str]:
    """The vocabulary written by the vocab stage: distinct single characters, at least 2."""
    chars = read_json(path, required={"chars": list})["chars"]
    if (
        len(chars) < 2
        or not all(isinstance(char, str) and len(char) == 1 for char in chars)
        or len(set(chars)) != len(chars)
    ):
        raise PipelineError(
            f"{path} is not a vocabulary: 'chars' must list 2 or more distinct single "
            "characters; rerun `dvc repro --force vocab`"
        )
    return chars


def load_tokens(path: Path) -> np.ndarray:
    """Memory-map a token file written by the vocab stage (a .npy of small unsigned ints).

    Copy-on-write ("c") rather than read-only, because torch tensors need writable memory;
    nothing writes to it, and the file itself is never changed.
    """
    try:
        tokens = np.load(path, mmap_mode="c")
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro vocab` to rebuild it") from None
    except (ValueError, EOFError, OSError) as error:
        # A zero-byte file is an EOFError, a truncated one a ValueError.
        reason = getattr(error, "strerror", None) or error or type(error).__name__
        raise PipelineError(
            f"{path} is not a token file ({reason}): it is damaged; rerun `dvc repro --force vocab`"
        ) from None
    if tokens.ndim != 1 or tokens.dtype.kind != "u":
        raise PipelineError(
            f"{path} holds {tokens.dtype} of shape {tokens.shape}, not a row of token ids: it is "
            "damaged; rerun `dvc repro --force vocab`"
        )
    return tokens


def to_device_tokens(tokens: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """The tokens as a tensor on device, kept narrow: uint8 for up to 256 characters.

    On the CPU a uint8 tensor shares the memory-mapped file's pages, so a corpus of any size
    costs no copy; batches and counts widen only the tokens they use to int64. Wider unsigned
    dtypes have few torch kernels, so those tokens become int32.
    """
    if tokens.dtype != np.uint8:
        tokens = tokens.astype(np.int32)
    return torch.from_numpy(tokens).to(device)


def get_batch(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) inputs and their next-token targets, drawn on the tokens' device."""
    starts = torch.randint(
        len(tokens) - block_size, (batch_size,), device=tokens.device, generator=generator
    )
    return batch_at(tokens, starts, block_size)


def batch_at(
    tokens: torch.Tensor, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 inputs tokens[s : s + T] and targets tokens[s + 1 : s + T + 1] per start s.

    One gather per tensor replaces the lecture's Python loop over batch rows.
    """
    positions = starts.unsqueeze(1) + torch.arange(block_size, device=tokens.device)
    return tokens[positions].long(), tokens[positions + 1].long()


def bigram_counts(
    tokens: torch.Tensor, vocab_size: int, chunk_tokens: int = COUNT_CHUNK_TOKENS
) -> torch.Tensor:
    """(V, V) float matrix: counts[i, j] = how often token j follows token i.

    One pass over the tokens, a chunk at a time, so that the pair ids never take more than a
    few tens of MB whatever the corpus size. The ids are int32 (V * V < 2**31 for any V whose
    count matrix fits in memory), which makes the pass several times faster than int64.
    """
    counts = torch.zeros(vocab_size * vocab_size, dtype=torch.int64, device=tokens.device)
    for start in range(0, len(tokens) - 1, chunk_tokens):
        chunk = tokens[start : start + chunk_tokens + 1].int()
        counts += torch.bincount(chunk[:-1] * vocab_size + chunk[1:], minlength=len(counts))
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
