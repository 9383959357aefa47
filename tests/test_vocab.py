"""The vocab stage's pieces: streaming character counts, encoding, the train/val split."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.vocab import count_characters, encode_split, token_dtype

TEXT = "First Citizen:\nBefore we proceed — any further, hear me speak. Café ☕ naïve!\n" * 40


@pytest.mark.parametrize("chunk_bytes", [3, 7, 64, 1 << 20])
def test_encode_decode_round_trip_across_chunk_boundaries(tmp_path, chunk_bytes):
    # Chunks of 3 or 7 bytes split the 2- and 3-byte UTF-8 characters between reads.
    corpus = tmp_path / "input.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    counts = count_characters(corpus, chunk_bytes)
    chars = [chr(code) for code in np.flatnonzero(counts)]
    assert chars == sorted(set(TEXT))
    assert int(counts.sum()) == len(TEXT)

    num_train = int(0.9 * len(TEXT))
    num_val = len(TEXT) - num_train
    train_path, val_path = tmp_path / "train.npy", tmp_path / "val.npy"
    encode_split(corpus, chars, num_train, num_val, train_path, val_path, chunk_bytes)
    train, val = np.load(train_path), np.load(val_path)
    assert train.dtype == np.uint8 and len(train) == num_train and len(val) == num_val
    decoded = "".join(chars[i] for i in np.concatenate([train, val]))
    assert decoded == TEXT
    assert decoded[:num_train] == TEXT[:num_train]


def test_tiny_shakespeare_vocabulary_and_split(shakespeare_corpus, tmp_path):
    counts = count_characters(shakespeare_corpus)
    chars = [chr(code) for code in np.flatnonzero(counts)]
    assert len(chars) == 65
    assert chars[:2] == ["\n", " "] and chars[-1] == "z"
    total = int(counts.sum())
    assert total == 1_115_394  # ASCII: one character per byte
    num_train = int(0.9 * total)
    assert (num_train, total - num_train) == (1_003_854, 111_540)


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(65, np.uint8), (256, np.uint8), (257, np.uint16), (70_000, np.uint32)],
)
def test_token_dtype_is_the_smallest_that_fits(vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)
