"""The CUDA path: the CUDA-graph step, device-side batches and counts, fused AdamW on the GPU.

These tests need a CUDA device, so CI (CPU only) skips them; `make gpu-check` runs them on a GPU
machine. They import nothing from conftest.py, MLflow or DVC, which such a machine may lack.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tqdm import tqdm

from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts, bigram_loss_from_counts, conditional_entropy
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.training import exact_losses, resolve_device, train_minibatch, train_on_counts
from pipeline.params import TrainParams

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (`make gpu-check` on a GPU machine)"
)

VOCAB_SIZE = 65
CUDA = torch.device("cuda")


def random_tokens(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB_SIZE, (length,), generator=generator).to(torch.uint8)


def trained_weights(tokens: torch.Tensor, config: TrainParams, **options) -> torch.Tensor:
    torch.manual_seed(config.seed)
    model = BigramLanguageModel(VOCAB_SIZE).to(tokens.device)
    train_minibatch(model, tokens, config, lambda step: None, tqdm(disable=True), **options)
    return model.token_embedding_table.weight.detach().cpu()


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"


def test_counts_and_exact_losses_on_cuda_equal_the_cpu_ones():
    tokens = random_tokens(100_003, seed=1)
    cpu_counts = bigram_counts(tokens, VOCAB_SIZE)
    cuda_counts = bigram_counts(tokens.to(CUDA), VOCAB_SIZE)
    assert torch.equal(cuda_counts.cpu(), cpu_counts)
    torch.manual_seed(0)
    model = BigramLanguageModel(VOCAB_SIZE)
    expected = exact_losses(model, cpu_counts, cpu_counts)
    assert exact_losses(model.to(CUDA), cuda_counts, cuda_counts) == pytest.approx(expected)


def test_cuda_graph_replays_the_eager_cuda_steps():
    """Same generator, same batches: the graph changes launches, not results. Only rounding
    differs: a capturable AdamW keeps its step count on the device, in float32."""
    tokens = random_tokens(20_000).to(CUDA)
    config = lecture_train_params(max_iters=60, eval_interval=20)
    eager = trained_weights(tokens, config, cuda_graph=False)
    graphed = trained_weights(tokens, config)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    torch.manual_seed(config.seed)
    initial = BigramLanguageModel(VOCAB_SIZE).token_embedding_table.weight.detach()
    assert (graphed - initial).abs().max() > 0.1, "training did not move the weights"


def test_cuda_graph_training_reaches_the_cpu_loss():
    tokens = random_tokens(20_000)
    config = lecture_train_params(max_iters=400, eval_interval=100)
    counts = bigram_counts(tokens, VOCAB_SIZE)
    cpu_loss = bigram_loss_from_counts(trained_weights(tokens, config), counts).item()
    # The CUDA generator draws other batches than the CPU one: compare losses, not weights.
    losses: list[float] = []
    torch.manual_seed(config.seed)
    model = BigramLanguageModel(VOCAB_SIZE).to(CUDA)
    cuda_counts = counts.to(CUDA)
    train_minibatch(
        model,
        tokens.to(CUDA),
        config,
        lambda step: losses.append(exact_losses(model, cuda_counts, cuda_counts)[0]),
        tqdm(disable=True),
    )
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1
    assert losses[-1] == pytest.approx(cpu_loss, abs=0.02)


def test_cuda_training_is_seeded():
    """The seed fixes the batches; the gradient's scatter-add may sum in another order on a GPU,
    so two runs agree to rounding, not bit for bit as on the CPU."""
    tokens = random_tokens(20_000).to(CUDA)
    config = lecture_train_params(max_iters=50, eval_interval=25, seed=7)
    first = trained_weights(tokens, config)
    torch.testing.assert_close(trained_weights(tokens, config), first, rtol=0, atol=1e-5)
    other = trained_weights(tokens, dataclasses.replace(config, seed=8))
    assert (other - first).abs().max() > 1e-3


def test_method_counts_on_cuda_reaches_the_optimum():
    tokens = random_tokens(50_000, seed=2)
    counts = bigram_counts(tokens.to(CUDA), VOCAB_SIZE)
    torch.manual_seed(0)
    model = BigramLanguageModel(VOCAB_SIZE).to(CUDA)
    train_on_counts(
        model, counts, lecture_train_params(method="counts"), lambda s: None, tqdm(disable=True)
    )
    gap = exact_losses(model, counts, counts)[0] - conditional_entropy(counts.cpu())
    # Below the optimum only by float32 rounding of the log-probabilities.
    assert -1e-5 <= gap < 1e-3


def test_generate_on_cuda_draws_from_the_table():
    torch.manual_seed(0)
    model = BigramLanguageModel(VOCAB_SIZE).to(CUDA)
    start = torch.zeros((2, 1), dtype=torch.long, device=CUDA)
    sample = model.generate(start, 200, generator=torch.Generator(CUDA).manual_seed(3))
    again = model.generate(start, 200, generator=torch.Generator(CUDA).manual_seed(3))
    assert sample.device.type == "cuda" and sample.shape == (2, 201)
    assert torch.equal(sample, again)
    assert int(sample.min()) >= 0 and int(sample.max()) < VOCAB_SIZE
