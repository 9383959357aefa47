"""Known answer: text drawn from a known bigram transition matrix; training must recover it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tqdm import tqdm

from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts, bigram_loss_from_counts, conditional_entropy
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.training import train_minibatch, train_on_counts
from tests.support.markov import entropy_rate, sample_chain

V = 8
NUM_TOKENS = 200_000


@pytest.fixture(scope="module")
def markov_chain() -> tuple[np.ndarray, torch.Tensor, float]:
    """A random transition matrix, a token sequence drawn from it, and its entropy rate."""
    rng = np.random.default_rng(1234)
    transitions = rng.dirichlet(np.full(V, 0.7), size=V)
    tokens = sample_chain(transitions, NUM_TOKENS, rng)
    return transitions, torch.from_numpy(tokens), entropy_rate(transitions)


def fit(method: str, tokens: torch.Tensor, **overrides) -> BigramLanguageModel:
    config = lecture_train_params(method=method, **overrides)
    torch.manual_seed(config.seed)
    model = BigramLanguageModel(V)
    fit_function = train_on_counts if method == "counts" else train_minibatch
    data = bigram_counts(tokens, V) if method == "counts" else tokens
    fit_function(model, data, config, lambda step: None, tqdm(disable=True))
    return model


def test_minibatch_training_recovers_the_transition_matrix(markov_chain):
    transitions, tokens, entropy_rate = markov_chain
    model = fit("minibatch", tokens, batch_size=64, max_iters=2000, eval_interval=1000, lr=0.01)
    learned = model.next_token_probs().detach().numpy()
    # 2000 steps x 512 positions, with AdamW's noise at lr 0.01: each entry lands within ~0.015.
    assert np.abs(learned - transitions).max() < 0.03
    loss = bigram_loss_from_counts(model.token_embedding_table.weight, bigram_counts(tokens, V))
    assert entropy_rate <= loss.item() + 0.005
    assert loss.item() - entropy_rate < 0.01


def test_counts_method_reaches_the_optimum_of_the_sample(markov_chain):
    transitions, tokens, entropy_rate = markov_chain
    counts = bigram_counts(tokens, V)
    model = fit("counts", tokens, max_iters=200, eval_interval=100)
    loss = bigram_loss_from_counts(model.token_embedding_table.weight, counts).item()
    optimum = conditional_entropy(counts)
    assert optimum <= loss < optimum + 1e-4
    assert abs(optimum - entropy_rate) < 0.01
    learned = model.next_token_probs().detach().numpy()
    empirical = (counts / counts.sum(dim=1, keepdim=True)).numpy()
    assert np.abs(learned - empirical).max() < 1e-3
    assert np.abs(learned - transitions).max() < 0.02


def test_training_is_deterministic_on_the_cpu(markov_chain):
    _, tokens, _ = markov_chain
    first = fit("minibatch", tokens, max_iters=200, eval_interval=100)
    second = fit("minibatch", tokens, max_iters=200, eval_interval=100)
    assert torch.equal(first.token_embedding_table.weight, second.token_embedding_table.weight)
