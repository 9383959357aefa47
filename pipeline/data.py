"""Token files and batches shared by the train, evaluate and sample stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.files import read_json


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
