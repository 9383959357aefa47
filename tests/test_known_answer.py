"""Known answers: text drawn from a known Markov chain. Training a bigram must recover its
transition matrix; a GPT, on a chain of the last two characters, must beat every bigram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tqdm import tqdm

from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts, bigram_loss_from_counts, conditional_entropy
from pipeline.lm.gpt import GPTLanguageModel, sliding_window_loss
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.sizes import GPTConfig
from pipeline.lm.training import train_minibatch, train_on_counts
from tests.support.markov import (
    entropy_rate,
    sample_chain,
    sample_second_order_chain,
    second_order_entropy_rate,
)

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


def test_a_gpt_uses_more_context_than_any_bigram_and_nears_the_entropy_rate():
    """Text whose next character depends on the last two: no bigram gets below the text's
    H(next | current); a GPT that sees 8 characters does, and comes close to the chain's
    entropy rate, the lowest loss any model can reach."""
    rng = np.random.default_rng(99)
    size = 6
    transitions = rng.dirichlet(np.full(size, 0.3), size=(size, size))
    tokens = torch.from_numpy(sample_second_order_chain(transitions, 60_000, rng))
    train, held_out = tokens[:50_000], tokens[50_000:]
    bigram_optimum = conditional_entropy(bigram_counts(held_out, size))
    rate = second_order_entropy_rate(transitions)
    assert bigram_optimum > rate + 0.3  # the chain's second-order dependence is strong

    config = lecture_train_params(
        block_size=8, max_iters=600, eval_interval=600, lr=3e-3, device="cpu"
    )
    torch.manual_seed(config.seed)
    model = GPTLanguageModel(GPTConfig(size, 8, n_layer=2, n_head=2, n_embd=32))
    train_minibatch(model, train, config, lambda step: None, tqdm(disable=True))
    loss = sliding_window_loss(model, held_out)
    assert loss < bigram_optimum - 0.2, (loss, bigram_optimum, rate)
    assert loss < rate + 0.08, (loss, rate)
