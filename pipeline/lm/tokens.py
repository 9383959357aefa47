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


# Tokens per bincount when a token file is checked against its vocabulary: bincount widens them
# to int64, 32 MB at most whatever the corpus size.
CHECK_CHUNK_TOKENS = 1 << 22


def load_encoded_corpus(
    vocab_path: Path, token_paths: tuple[Path, ...], max_vocab_size: int | None = None
) -> tuple[list[str], list[np.ndarray]]:
    """The vocabulary and the token files of the vocab stage, checked against each other.

    The vocab stage lists exactly the corpus's characters and encodes the corpus with them, so
    its token files use every id in [0, V) and no other. A vocab.json edited by hand or token
    files of another run would otherwise fail deep in torch (an index or shape error, or an
    allocator's for a vocabulary far too large) or silently train on the wrong characters. With
    max_vocab_size (data.max_vocab_size), a larger vocabulary is refused before any V x V table
    is allocated.
    """
    chars = load_vocab(vocab_path)
    if max_vocab_size is not None and len(chars) > max_vocab_size:
        raise PipelineError(
            f"{vocab_path} lists {len(chars):,} characters, above data.max_vocab_size = "
            f"{max_vocab_size:,}: rerun `dvc repro --force vocab`, which rebuilds it from the "
            "corpus and checks that bound, or raise data.max_vocab_size in params.yaml"
        )
    splits = [load_tokens(path) for path in token_paths]
    used = np.zeros(len(chars), dtype=bool)
    for path, tokens in zip(token_paths, splits, strict=True):
        used |= token_ids_used(path, tokens, vocab_path, len(chars))
    if not used.all():
        raise PipelineError(
            f"{vocab_path} lists {len(chars):,} characters but the token files use only "
            f"{int(used.sum()):,} of them (the vocab stage lists exactly the corpus's): it was "
            "edited or comes from another run; rerun `dvc repro --force vocab`"
        )
    return chars, splits


def token_ids_used(path: Path, tokens: np.ndarray, vocab_path: Path, vocab_size: int) -> np.ndarray:
    """Which of the vocabulary's ids occur in a token file; an id outside it is an error."""
    used = np.zeros(vocab_size, dtype=bool)
    for start in range(0, len(tokens), CHECK_CHUNK_TOKENS):
        chunk = tokens[start : start + CHECK_CHUNK_TOKENS]
        largest = int(chunk.max())
        if largest >= vocab_size:
            raise PipelineError(
                f"{path} holds token id {largest:,} but {vocab_path} lists only {vocab_size:,} "
                "characters: they do not come from the same run of the vocab stage; rerun "
                "`dvc repro --force vocab`"
            )
        used |= np.bincount(chunk, minlength=vocab_size) > 0
    return used


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
