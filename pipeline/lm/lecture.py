"""The lecture's algorithm (ng-video-lecture bigram.py), written anew: the one readable reference.

The benchmarks measure the pipeline against it (benchmarks/reference.py runs it end to end), and
the tests check that the pipeline's fast paths (pipeline/lm/training.py, pipeline/lm/sampling.py)
compute what it computes. No stage imports it.

It keeps what the pipeline improves on: batches stacked row by row in Python, a forward pass
over every (B, T) position, ``estimate_loss`` from 200 random batches per split with a host
read per batch, and a ``generate`` that feeds the whole growing sequence back at every step.

Run end to end, as the lecture's script does (3000 steps, an estimate every 300, a 500-character
sample), by ``python -m benchmarks.reference path/to/input.txt``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.params import TrainParams

BATCH_SIZE = 32
BLOCK_SIZE = 8
MAX_ITERS = 3000
EVAL_INTERVAL = 300
LEARNING_RATE = 1e-2
EVAL_ITERS = 200
SEED = 1337
SAMPLE_CHARS = 500


def lecture_train_params(**overrides) -> TrainParams:
    """The lecture's hyperparameters as the pipeline's train params, for the benchmarks and the
    tests that run the pipeline's loops beside this one. (params.yaml commits the same values:
    tests/test_params.py checks that.)"""
    lecture = TrainParams(
        method="minibatch",
        batch_size=BATCH_SIZE,
        block_size=BLOCK_SIZE,
        max_iters=MAX_ITERS,
        eval_interval=EVAL_INTERVAL,
        lr=LEARNING_RATE,
        seed=SEED,
        device="auto",
    )
    return dataclasses.replace(lecture, **overrides)


def encode_corpus(text: str) -> tuple[list[str], torch.Tensor]:
    """The sorted characters and the text as one int64 token per character."""
    chars = sorted(set(text))
    index_of = {char: index for index, char in enumerate(chars)}
    return chars, torch.tensor([index_of[char] for char in text], dtype=torch.long)


def split_tokens(tokens: torch.Tensor, train_fraction: float = 0.9):
    cut = int(train_fraction * len(tokens))
    return tokens[:cut], tokens[cut:]


def stacked_batch(
    tokens: torch.Tensor,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    batch_size: int = BATCH_SIZE,
    block_size: int = BLOCK_SIZE,
):
    """(B, T) inputs and targets, one Python slice per row, as the lecture draws them; the
    tokens stay on the CPU and each batch is copied to the device. The lecture draws from the
    global generator; tests pass their own to compare batch for batch with the pipeline."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    inputs = torch.stack([tokens[start : start + block_size] for start in starts])
    targets = torch.stack([tokens[start + 1 : start + block_size + 1] for start in starts])
    return inputs.to(device), targets.to(device)


class ReferenceBigram(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.table(idx)
        if targets is None:
            return logits, None
        batch, time_steps, channels = logits.shape
        flat_logits = logits.view(batch * time_steps, channels)
        return flat_logits, F.cross_entropy(flat_logits, targets.view(batch * time_steps))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Each step runs the model on the whole sequence so far and keeps the last logits."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, num_samples=1)], dim=1)
        return idx


def train_steps(
    model: nn.Module,
    optimizer,
    train_tokens: torch.Tensor,
    steps: int,
    device="cpu",
    generator: torch.Generator | None = None,
    batch_size: int = BATCH_SIZE,
    block_size: int = BLOCK_SIZE,
):
    """The lecture's loop, for its bigram or its GPT (pipeline/lm/lecture_gpt.py)."""
    for _ in range(steps):
        inputs, targets = stacked_batch(train_tokens, device, generator, batch_size, block_size)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    splits: dict[str, torch.Tensor],
    eval_iters: int = EVAL_ITERS,
    device: torch.device | str = "cpu",
    batch_size: int = BATCH_SIZE,
    block_size: int = BLOCK_SIZE,
) -> dict[str, float]:
    """Mean loss over eval_iters random batches per split, each loss read back to the host."""
    model.eval()
    estimates = {}
    for name, tokens in splits.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            batch = stacked_batch(tokens, device, batch_size=batch_size, block_size=block_size)
            _, loss = model(*batch)
            losses[k] = loss.item()
        estimates[name] = losses.mean().item()
    model.train()
    return estimates


def new_model_and_optimizer(vocab_size: int, device: torch.device | str = "cpu", seed: int = SEED):
    torch.manual_seed(seed)
    model = ReferenceBigram(vocab_size).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
