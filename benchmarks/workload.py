"""The corpus, encoded once for both sides: int64 tensors for the reference, uint8 for us."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import REPO_ROOT
from pipeline.lm import lecture
from pipeline.lm.counts import bigram_counts, conditional_entropy
from pipeline.lm.tokens import to_device_tokens
from pipeline.params import CORPUS_URL_ENV

DEFAULT_CORPUS = REPO_ROOT / "data" / "raw" / "input.txt"


def find_corpus(path: str | None) -> Path:
    """--corpus, else the pipeline's downloaded copy, else a local $BIGRAM_CORPUS_URL."""
    if path:
        candidates = [Path(path)]
    else:
        candidates = [DEFAULT_CORPUS]
        source = os.environ.get(CORPUS_URL_ENV, "")
        parsed = urllib.parse.urlparse(source)
        if parsed.scheme == "file":
            candidates.append(Path(urllib.parse.unquote(parsed.path)))
        elif source and not parsed.scheme:
            candidates.append(Path(source))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SystemExit(
        f"error: no corpus at {', '.join(map(str, candidates))}: run `dvc repro download`, "
        f"pass --corpus PATH or set {CORPUS_URL_ENV} to a file:// URL"
    )


@dataclass
class Workload:
    corpus: Path
    chars: list[str]
    reference_train: torch.Tensor  # int64, as the lecture keeps its data
    reference_val: torch.Tensor
    train_tokens: torch.Tensor  # uint8, as the train stage holds the vocab stage's files
    val_tokens: torch.Tensor
    train_counts: torch.Tensor
    val_counts: torch.Tensor
    optimum: float

    @property
    def vocab_size(self) -> int:
        return len(self.chars)


def load_workload(corpus: Path) -> Workload:
    chars, tokens = lecture.encode_corpus(corpus.read_text(encoding="utf-8"))
    reference_train, reference_val = lecture.split_tokens(tokens)
    # The vocab stage's storage: uint8 up to 256 characters (wider ones load as int32).
    dtype = np.uint8 if len(chars) <= 256 else np.int32
    train_tokens = to_device_tokens(reference_train.numpy().astype(dtype), "cpu")
    val_tokens = to_device_tokens(reference_val.numpy().astype(dtype), "cpu")
    train_counts = bigram_counts(train_tokens, len(chars))
    return Workload(
        corpus=corpus,
        chars=chars,
        reference_train=reference_train,
        reference_val=reference_val,
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        train_counts=train_counts,
        val_counts=bigram_counts(val_tokens, len(chars)),
        optimum=conditional_entropy(train_counts),
    )
