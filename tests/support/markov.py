"""Text from a known Markov chain, whose entropy rate is the lowest loss a bigram can reach."""

from __future__ import annotations

import numpy as np


def sample_chain(transitions: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A token sequence of the given length drawn from the chain, starting in state 0."""
    cumulative = transitions.cumsum(axis=1)
    uniforms = rng.random(length)
    last = len(transitions) - 1
    tokens = np.empty(length, dtype=np.int64)
    tokens[0] = 0
    for i in range(1, length):
        # min(): a uniform above a row's rounded total of 1.0 - 1e-16 must not leave the chain.
        tokens[i] = min(np.searchsorted(cumulative[tokens[i - 1]], uniforms[i]), last)
    return tokens


def stationary_distribution(transitions: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eig(transitions.T)
    vector = np.real(eigenvectors[:, np.argmax(np.real(eigenvalues))])
    return vector / vector.sum()


def entropy_rate(transitions: np.ndarray) -> float:
    """H = -sum_i pi_i sum_j P_ij ln P_ij in nats, pi the stationary distribution."""
    stationary = stationary_distribution(transitions)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(transitions > 0, transitions * np.log(transitions), 0.0)
    return float(-(stationary[:, None] * terms).sum())


def sample_second_order_chain(
    transitions: np.ndarray, length: int, rng: np.random.Generator
) -> np.ndarray:
    """A sequence whose next token depends on the last two: transitions[a, b] is the
    distribution of the token after ``a b``. Starts with 0 0."""
    cumulative = transitions.cumsum(axis=2)
    uniforms = rng.random(length)
    last = transitions.shape[0] - 1
    tokens = np.zeros(length, dtype=np.int64)
    for i in range(2, length):
        row = cumulative[tokens[i - 2], tokens[i - 1]]
        tokens[i] = min(np.searchsorted(row, uniforms[i]), last)
    return tokens


def second_order_entropy_rate(transitions: np.ndarray) -> float:
    """The entropy rate of a second-order chain: that of the first-order chain on pairs
    (a, b) -> (b, c), the lowest loss any model of the text can reach."""
    size = transitions.shape[0]
    pairs = np.zeros((size * size, size * size))
    for a in range(size):
        for b in range(size):
            pairs[a * size + b, b * size : (b + 1) * size] = transitions[a, b]
    return entropy_rate(pairs)
