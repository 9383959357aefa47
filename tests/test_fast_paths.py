"""The fast code paths compute what the plain ones do (speed itself is measured in benchmarks/)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from pipeline.lm import lecture
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts, bigram_loss_from_counts, conditional_entropy
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.tokens import get_batch, to_device_tokens
from pipeline.lm.training import (
    closed_form_step,
    eval_steps,
    lecture_step,
    train_minibatch,
    train_on_counts,
)
from pipeline.params import TrainParams
from testbed import REPO_ROOT, write_committed_params

VOCAB_SIZE = 65


def random_tokens(length: int, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (length,), generator=generator).to(torch.uint8)


def trained_with(fit, tokens_or_counts, config: TrainParams) -> tuple[torch.Tensor, list[int]]:
    torch.manual_seed(config.seed)
    model = BigramLanguageModel(VOCAB_SIZE)
    eval_points: list[int] = []
    fit(model, tokens_or_counts, config, eval_points.append, tqdm(disable=True))
    return model.token_embedding_table.weight.detach().clone(), eval_points


def test_batch_loss_and_its_gradient_equal_forward():
    torch.manual_seed(0)
    model = BigramLanguageModel(VOCAB_SIZE)
    inputs, targets = get_batch(random_tokens(5000).long(), batch_size=32, block_size=8)
    _, loss = model(inputs, targets)
    (forward_grad,) = torch.autograd.grad(loss, model.token_embedding_table.weight)
    fast_loss = model.batch_loss(inputs, targets)
    (fast_grad,) = torch.autograd.grad(fast_loss, model.token_embedding_table.weight)
    torch.testing.assert_close(fast_loss, loss)
    torch.testing.assert_close(fast_grad, forward_grad)


def test_closed_form_gradient_equals_autograd():
    """The CPU step's gradient (batch_loss_gradient) is autograd's, for a batch with repeated
    pairs and characters that never occur, and at a table far from its initial values."""
    torch.manual_seed(0)
    model = BigramLanguageModel(VOCAB_SIZE)
    with torch.no_grad():
        model.token_embedding_table.weight.mul_(5)
    tokens = random_tokens(5000, vocab_size=20).long()  # Rows 20..64 get no pair at all.
    for batch_size, block_size in ((32, 8), (1, 1), (4, 64)):
        inputs, targets = get_batch(tokens, batch_size=batch_size, block_size=block_size)
        _, loss = model(inputs, targets)
        (expected,) = torch.autograd.grad(loss, model.token_embedding_table.weight)
        closed_form = model.batch_loss_gradient(inputs, targets)
        torch.testing.assert_close(closed_form, expected, rtol=1e-5, atol=1e-7)
        # A character that is never the current one gets no gradient; one that is, does.
        assert closed_form[20:].abs().max() == 0
        assert closed_form[inputs.unique()].abs().sum(dim=1).min() > 0


def test_train_minibatch_follows_the_lecture_loop():
    """The lecture's loop (pipeline/lm/lecture.py), fed the same random stream, ends with the
    same table: the gather, the one log-softmax and fused AdamW change speed, not the math."""
    tokens = random_tokens(20_000)
    config = lecture_train_params(max_iters=120, eval_interval=50, lr=1e-2)
    weights, eval_points = trained_with(train_minibatch, tokens, config)
    assert eval_points == [0, 50, 100, 120]
    model, optimizer = lecture.new_model_and_optimizer(VOCAB_SIZE, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    lecture.train_steps(model, optimizer, tokens.long(), config.max_iters, generator=generator)
    expected = model.table.weight.detach()
    # Only float rounding differs (fused AdamW, one log-softmax for the whole batch).
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-5)
    torch.manual_seed(config.seed)
    initial = BigramLanguageModel(VOCAB_SIZE).token_embedding_table.weight.detach()
    assert (weights - initial).abs().max() > 0.1, "training did not move the weights"


def test_the_closed_form_step_is_the_lectures_step():
    """The CPU's step (closed_form_step) and the lecture's (lecture_step: loss, zero_grad,
    backward, step), from one seed, draw the same batches and end with the same table."""
    tokens = random_tokens(20_000)
    config = lecture_train_params(max_iters=100, eval_interval=50)
    tables = []
    for make_step in (lecture_step, closed_form_step):
        torch.manual_seed(config.seed)
        model = BigramLanguageModel(VOCAB_SIZE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, fused=True)
        generator = torch.Generator().manual_seed(config.seed)
        step = make_step(model, optimizer, tokens, config, generator)
        for _ in range(config.max_iters):
            step()
        tables.append(model.token_embedding_table.weight.detach())
    torch.testing.assert_close(tables[1], tables[0], rtol=0, atol=1e-5)
    torch.manual_seed(config.seed)
    initial = BigramLanguageModel(VOCAB_SIZE).token_embedding_table.weight.detach()
    assert (tables[0] - initial).abs().max() > 0.1, "training did not move the weights"


def test_train_minibatch_is_deterministic_on_cpu():
    tokens = random_tokens(20_000)
    config = lecture_train_params(max_iters=50, eval_interval=25, seed=7)
    first, _ = trained_with(train_minibatch, tokens, config)
    second, _ = trained_with(train_minibatch, tokens, config)
    assert torch.equal(first, second)
    other_seed, _ = trained_with(train_minibatch, tokens, dataclasses.replace(config, seed=8))
    assert not torch.equal(first, other_seed)


def test_bigram_counts_is_the_same_in_any_chunking():
    tokens = random_tokens(10_001, seed=3)
    wide = tokens.long()
    expected = torch.zeros(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.float64)
    expected.index_put_((wide[:-1], wide[1:]), torch.ones(len(wide) - 1, dtype=torch.float64), True)
    for chunk_tokens in (1, 7, 4096, 1 << 22):
        assert torch.equal(bigram_counts(tokens, VOCAB_SIZE, chunk_tokens), expected)


def test_token_tensors_stay_narrow_and_wide_vocabularies_widen():
    narrow = to_device_tokens(np.array([3, 1, 2], dtype=np.uint8), "cpu")
    assert narrow.dtype == torch.uint8
    wide = to_device_tokens(np.array([300, 1, 70_000], dtype=np.uint32), "cpu")
    assert wide.dtype == torch.int32 and wide.tolist() == [300, 1, 70_000]
    counts = bigram_counts(to_device_tokens(np.array([299, 0, 299], dtype=np.uint16), "cpu"), 300)
    assert counts[299, 0] == 1 and counts[0, 299] == 1 and counts.sum() == 2


def model_with_probs(probs: torch.Tensor) -> BigramLanguageModel:
    model = BigramLanguageModel(probs.shape[0])
    with torch.no_grad():
        model.token_embedding_table.weight.copy_(probs.log())
    return model


def test_generate_samples_the_model_distribution_in_batches():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 5, generator=generator, dtype=torch.float64)
    probs[:, 3] = 0.0  # Token 3 can never follow anything.
    probs /= probs.sum(dim=1, keepdim=True)
    model = model_with_probs(probs)
    starts = torch.tensor([[0, 1], [2, 4], [4, 0]])
    samples = model.generate(starts, 20_000, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (3, 20_002) and samples.dtype == torch.long
    assert torch.equal(samples[:, :2], starts)
    assert not (samples[:, 2:] == 3).any()
    # Empirical transition frequencies of the 60,000 draws against the model's table.
    pairs = samples[:, 1:-1].reshape(-1) * 5 + samples[:, 2:].reshape(-1)
    observed = torch.bincount(pairs, minlength=25).view(5, 5).double()
    observed /= observed.sum(dim=1, keepdim=True).clamp(min=1)
    visited = observed.sum(dim=1) > 0
    torch.testing.assert_close(observed[visited], probs[visited], atol=0.02, rtol=0)


def test_generate_is_seeded_and_follows_a_deterministic_chain():
    model = BigramLanguageModel(VOCAB_SIZE)
    first = model.generate(
        torch.zeros((2, 1), dtype=torch.long), 50, generator=torch.Generator().manual_seed(5)
    )
    again = model.generate(
        torch.zeros((2, 1), dtype=torch.long), 50, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])
    # A table where token i is always followed by i + 1 (mod 4).
    chain = torch.full((4, 4), 1e-12, dtype=torch.float64)
    chain[torch.arange(4), (torch.arange(4) + 1) % 4] = 1.0
    sample = model_with_probs(chain / chain.sum(1, keepdim=True)).generate(
        torch.tensor([[2]]), 9, generator=torch.Generator().manual_seed(0)
    )
    assert sample[0].tolist() == [2, 3, 0, 1, 2, 3, 0, 1, 2, 3]


@pytest.fixture(scope="module")
def shakespeare_counts(shakespeare_corpus: Path) -> torch.Tensor:
    text = np.frombuffer(shakespeare_corpus.read_bytes(), dtype=np.uint8)
    alphabet, tokens = np.unique(text, return_inverse=True)
    assert len(alphabet) == VOCAB_SIZE
    train = to_device_tokens(tokens[: int(0.9 * len(tokens))].astype(np.uint8), "cpu")
    return bigram_counts(train, VOCAB_SIZE)


def test_method_counts_reaches_the_bigram_optimum(shakespeare_counts):
    optimum = conditional_entropy(shakespeare_counts)
    assert optimum == pytest.approx(2.4519, abs=1e-4)
    weights, eval_points = trained_with(train_on_counts, shakespeare_counts, lecture_train_params())
    assert eval_points == eval_steps(3000, 300)
    gap = bigram_loss_from_counts(weights, shakespeare_counts).item() - optimum
    assert 0 <= gap < 1e-3


def test_download_and_vocab_stages_never_import_torch(tmp_path: Path, corpus_url: str):
    """Run the two stages for real, under -X importtime, which lists every module loaded."""
    write_committed_params(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), BIGRAM_CORPUS_URL=corpus_url)
    for stage in ("download", "vocab"):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", f"pipeline.stages.{stage}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        imported = {
            line.rsplit("|", 1)[1].strip()
            for line in result.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "mlflow" in imported, "importtime output was not captured"
        assert not {name for name in imported if name.split(".")[0] == "torch"}, stage
    assert (tmp_path / "data/vocab/train.npy").stat().st_size > 1_000_000
    assert math.isfinite(float(np.load(tmp_path / "data/vocab/val.npy").mean()))
