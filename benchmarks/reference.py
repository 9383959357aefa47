"""The lecture's script, end to end: ``python -m benchmarks.reference path/to/input.txt``.

3000 steps, an estimate every 300, a 500-character sample, as ng-video-lecture's bigram.py runs;
the algorithm is pipeline/lm/lecture.py's. The benchmarks time this command against `dvc repro`.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.lm.lecture import (
    EVAL_INTERVAL,
    MAX_ITERS,
    SAMPLE_CHARS,
    encode_corpus,
    estimate_loss,
    new_model_and_optimizer,
    split_tokens,
    train_steps,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", help="path of the training text (Tiny Shakespeare)")
    parser.add_argument("--max-iters", type=int, default=MAX_ITERS)
    parser.add_argument("--eval-interval", type=int, default=EVAL_INTERVAL)
    args = parser.parse_args()
    started = time.perf_counter()
    with open(args.corpus, encoding="utf-8") as handle:
        chars, tokens = encode_corpus(handle.read())
    train_tokens, val_tokens = split_tokens(tokens)
    model, optimizer = new_model_and_optimizer(len(chars))
    for step in range(args.max_iters):
        if step % args.eval_interval == 0:
            losses = estimate_loss(model, {"train": train_tokens, "val": val_tokens})
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        train_steps(model, optimizer, train_tokens, 1)
    sample = model.generate(torch.zeros((1, 1), dtype=torch.long), SAMPLE_CHARS)[0].tolist()
    print("".join(chars[i] for i in sample))
    print(f"reference run: {time.perf_counter() - started:.2f} s after imports")


if __name__ == "__main__":
    main()
