"""The bigram model: shapes, loss, generation, and the exact count-based loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts, bigram_loss_from_counts, conditional_entropy
from pipeline.lm.tokens import get_batch

V = 65


@pytest.fixture
def model() -> BigramLanguageModel:
    torch.manual_seed(0)
    return BigramLanguageModel(V)


def test_forward_shapes_and_loss_match_cross_entropy(model):
    idx = torch.randint(V, (4, 8))
    targets = torch.randint(V, (4, 8))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 8, V)
    # Each position's logits are the embedding row of its own token: the model is a bigram.
    assert torch.equal(logits[1, 3], model.token_embedding_table.weight[idx[1, 3]])
    manual = -F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_forward_without_targets_returns_no_loss(model):
    logits, loss = model(torch.zeros((2, 3), dtype=torch.long))
    assert logits.shape == (2, 3, V) and loss is None


def test_initial_loss_is_near_ln_v_plus_half(model):
    # N(0, 1) logits: E[logsumexp] ~ ln V + 1/2, so the untrained loss is ~4.67 for V = 65.
    idx = torch.randint(V, (64, 64))
    _, loss = model(idx, torch.randint(V, (64, 64)))
    assert abs(loss.item() - (math.log(V) + 0.5)) < 0.15


def test_generate_appends_tokens_for_each_row(model):
    prompt = torch.tensor([[0, 5, 7], [1, 2, 3]])
    out = model.generate(prompt, 50, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 53)
    assert torch.equal(out[:, :3], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < V


def test_generate_zero_tokens_returns_the_prompt(model):
    prompt = torch.tensor([[3, 4]])
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_generation_depends_only_on_the_last_token(model):
    # The lecture's generate feeds the whole sequence back; a bigram's next token depends only
    # on the last one, so a long prompt and its last token alone must give the same sample.
    prompt = torch.tensor([[0, 3, 10], [5, 9, 1]])
    ours = model.generate(prompt, 200, generator=torch.Generator().manual_seed(7))
    last_only = model.generate(prompt[:, -1:], 200, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours[:, 3:], last_only[:, 1:])


def test_temperature_sharpens_the_distribution(model):
    cold = model.next_token_probs(temperature=0.1)
    warm = model.next_token_probs(temperature=1.0)
    assert torch.allclose(cold.sum(dim=1), torch.ones(V))
    assert (cold.max(dim=1).values >= warm.max(dim=1).values).all()


def test_count_based_loss_equals_mean_loss_over_every_bigram(model):
    tokens = torch.randint(V, (5_000,))
    counts = bigram_counts(tokens, V)
    assert counts.sum() == len(tokens) - 1
    logits = model.token_embedding_table.weight
    direct = F.cross_entropy(logits[tokens[:-1]], tokens[1:]).item()
    assert bigram_loss_from_counts(logits, counts).item() == pytest.approx(direct, rel=1e-6)


def test_conditional_entropy_is_the_loss_of_the_count_model():
    tokens = torch.tensor([0, 1, 0, 1, 0, 2, 0, 1])
    counts = bigram_counts(tokens, 3)
    # After 0: 1 three times, 2 once; after 1: 0 twice; after 2: 0 once.
    expected = -(3 * math.log(3 / 4) + math.log(1 / 4)) / 7
    assert conditional_entropy(counts) == pytest.approx(expected)
    count_model_logits = (counts / counts.sum(dim=1, keepdim=True)).clamp_min(1e-30).log()
    assert bigram_loss_from_counts(count_model_logits, counts).item() == pytest.approx(expected)


def test_get_batch_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(1000)
    inputs, targets = get_batch(tokens, 32, 8, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (32, 8)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(targets[:, -1], inputs[:, -1] + 1)
    assert int(targets.max()) <= 999
