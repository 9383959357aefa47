"""Stage 2, vocab: build the character vocabulary, encode the corpus, split train/val.

The vocabulary is the sorted set of distinct characters (65 for Tiny Shakespeare). Token ids
are stored in the smallest unsigned dtype that holds them (uint8 here) as .npy files, which
the train stage memory-maps. The first ``data.train_fraction`` of the tokens is the train
split and the rest the val split, as in the lecture. The corpus is streamed in chunks, twice
(count characters, then encode), so memory stays bounded for corpora far larger than this one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.files import (
    atomic_path,
    file_sha256,
    outputs_removed_on_failure,
    read_json,
    write_json,
)
from pipeline.params import check_vocab_size, load_params, split_sizes
from pipeline.paths import (
    CORPUS_PATH,
    DOWNLOAD_INFO_FIELDS,
    DOWNLOAD_INFO_PATH,
    MANIFEST_PATH,
    TRAIN_TOKENS_PATH,
    VAL_TOKENS_PATH,
    VOCAB_PATH,
)
from pipeline.tracking import lineage, runs

# 1 MB of UTF-8 becomes up to 4 MB of code points: small beside any corpus, and large enough
# that numpy, not Python, does the work.
CHUNK_BYTES = 1 << 20
UNICODE_SIZE = 0x110000


def read_codepoints(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Yield the corpus's Unicode code points as uint32 arrays, one chunk at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    bytes_read = 0
    # Bytes of a character split across chunks wait in the decoder; they start its next input.
    pending = 0
    try:
        with open(path, "rb") as corpus:
            while raw := corpus.read(chunk_bytes):
                pending = len(decoder.getstate()[0])
                text = decoder.decode(raw)
                bytes_read += len(raw)
                if text:
                    yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            pending = len(decoder.getstate()[0])
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise PipelineError(
            f"{path} is not UTF-8 text (bad byte at offset {bytes_read - pending + error.start}); "
            "check the corpus source and data.sha256"
        ) from None
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro download`") from None


def count_characters(path: Path, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """How often each code point occurs: an array indexed by code point."""
    counts = np.zeros(UNICODE_SIZE, dtype=np.int64)
    for codepoints in read_codepoints(path, chunk_bytes):
        # Up to the chunk's largest code point only: a full-range count per chunk costs 9 MB.
        chunk_counts = np.bincount(codepoints)
        counts[: len(chunk_counts)] += chunk_counts
    return counts


def check_distinct_characters(chars: list[str], path: Path) -> None:
    """Refuse a corpus of one distinct character here, where the fix is the corpus: a bigram
    model chooses the next character among V, so it needs V >= 2, and no later stage could
    make a usable model of it."""
    if len(chars) < 2:
        raise PipelineError(
            f"{path} holds a single distinct character ({chars[0]!r}): a bigram model needs at "
            "least 2; train on another corpus: point data.url and data.sha256 at it (or "
            "BIGRAM_CORPUS_URL, which overrides data.url)"
        )


def token_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise AssertionError("a vocabulary of code points always fits uint32")


def encode_split(
    path: Path,
    chars: list[str],
    num_train: int,
    num_val: int,
    train_out: Path,
    val_out: Path,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Encode the corpus into two .npy token files, first num_train tokens then the rest.

    The files are written sequentially, a chunk at a time: pages written through a memory map
    would stay resident in this process until the end, costing memory the size of the corpus.
    """
    dtype = token_dtype(len(chars))
    lookup = np.zeros(UNICODE_SIZE, dtype=dtype)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=dtype)
    with (
        atomic_path(train_out) as train_tmp,
        atomic_path(val_out) as val_tmp,
        open(train_tmp, "wb") as train,
        open(val_tmp, "wb") as val,
    ):
        for out, length in ((train, num_train), (val, num_val)):
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(out, {**header, "shape": (length,)})
        position = 0
        for codepoints in read_codepoints(path, chunk_bytes):
            tokens = lookup[codepoints]
            head = max(0, min(len(tokens), num_train - position))
            train.write(tokens[:head])
            val.write(tokens[head:])
            position += len(tokens)


def main() -> None:
    params = load_params()
    download_info = read_json(DOWNLOAD_INFO_PATH, DOWNLOAD_INFO_FIELDS)
    with (
        runs.stage_run("vocab", params, run_name=runs.corpus_run_name("vocab", params)),
        outputs_removed_on_failure(TRAIN_TOKENS_PATH, VAL_TOKENS_PATH, VOCAB_PATH, MANIFEST_PATH),
    ):
        mlflow.log_params(
            {
                "data.train_fraction": params.data.train_fraction,
                "data.max_vocab_size": params.data.max_vocab_size,
            }
        )
        counts = count_characters(CORPUS_PATH)
        chars = [chr(code) for code in np.flatnonzero(counts)]
        check_vocab_size(len(chars), params.data.max_vocab_size)
        num_train, num_val = split_sizes(int(counts.sum()), params.data.train_fraction, CORPUS_PATH)
        check_distinct_characters(chars, CORPUS_PATH)
        encode_split(CORPUS_PATH, chars, num_train, num_val, TRAIN_TOKENS_PATH, VAL_TOKENS_PATH)
        write_json(VOCAB_PATH, {"chars": chars})
        mlflow.log_metrics(
            {"vocab_size": len(chars), "train_tokens": num_train, "val_tokens": num_val}
        )
        mlflow.log_artifact(str(VOCAB_PATH))
        write_json(
            MANIFEST_PATH,
            {
                "corpus_sha256": download_info["sha256"],
                "vocab_size": len(chars),
                "train_tokens": num_train,
                "val_tokens": num_val,
                "dtype": str(token_dtype(len(chars))),
            },
        )
        # Later stages find this run by the manifest's hash: no run id enters a DVC output.
        mlflow.set_tag(lineage.MANIFEST_TAG, file_sha256(MANIFEST_PATH))
    print(f"vocabulary of {len(chars)} characters; {num_train:,} train and {num_val:,} val tokens")


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
