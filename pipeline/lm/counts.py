"""Bigram counts, and the exact losses they give: the maths the whole pipeline rests on.

A bigram model's loss depends on the data only through the (V, V) matrix of bigram counts:
counts[i, j] is how often token j follows token i. From it, in O(V^2) whatever the corpus size:

- the exact mean loss of any logits table over every bigram of a split (bigram_loss_from_counts),
  which training logs at every eval point and evaluate reports, instead of the lecture's estimate
  from 200 random batches;
- the lowest loss any bigram model can reach on a split, its conditional entropy H(next | current)
  (2.4519 on Tiny Shakespeare's train split): a train loss below it is a bug;
- the counting model of the makemore lecture (add-one smoothed counts) and its val loss;
- a uniform guess's loss, ln(V) = 4.1744 for V = 65.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Tokens per bincount in bigram_counts: 4M tokens make 16 MB of int32 pair ids.
COUNT_CHUNK_TOKENS = 1 << 22


def bigram_counts(
    tokens: torch.Tensor, vocab_size: int, chunk_tokens: int = COUNT_CHUNK_TOKENS
) -> torch.Tensor:
    """(V, V) float matrix: counts[i, j] = how often token j follows token i.

    One pass over the tokens, a chunk at a time, so that the pair ids never take more than a
    few tens of MB whatever the corpus size. The ids are int32 (V * V < 2**31 for any V whose
    count matrix fits in memory), which makes the pass several times faster than int64.
    """
    counts = torch.zeros(vocab_size * vocab_size, dtype=torch.int64, device=tokens.device)
    for start in range(0, len(tokens) - 1, chunk_tokens):
        chunk = tokens[start : start + chunk_tokens + 1].int()
        counts += torch.bincount(chunk[:-1] * vocab_size + chunk[1:], minlength=len(counts))
    return counts.view(vocab_size, vocab_size).to(torch.float64)


def conditional_entropy(counts: torch.Tensor) -> float:
    """H(next | current) in nats: the lowest mean loss any bigram model reaches on these counts."""
    probs = next_token_frequencies(counts)
    nonzero = counts > 0
    return float(-(counts[nonzero] * probs[nonzero].log()).sum() / counts.sum())


def smoothed_probs(counts: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha (Laplace) smoothed next-token probabilities, as in the makemore lecture."""
    smoothed = counts + alpha
    return smoothed / smoothed.sum(dim=1, keepdim=True)


def uniform_loss(vocab_size: int) -> float:
    """Loss of a uniform guess over the vocabulary: ln(V) = 4.1744 for V = 65."""
    return math.log(vocab_size)


def bigram_loss_from_counts(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Exact mean cross-entropy over every bigram of a split, given its (V, V) count matrix.

    counts[i, j] is how often token j follows token i. Summing -log softmax(logits)[i, j] over
    all N bigrams equals sum(counts * -log_softmax(logits)) / N: O(V^2) once counts are known.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(counts * log_probs).sum() / counts.sum()


def next_token_frequencies(counts: torch.Tensor) -> torch.Tensor:
    """Each row of counts divided by its total: the counted next-token probabilities (0 where a
    token is never followed)."""
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def counts_model_loss(train_counts: torch.Tensor, val_counts: torch.Tensor) -> float:
    """Val loss of the counting model (add-one smoothed train counts): the best a bigram
    estimated from the train split does on val in practice."""
    log_probs = smoothed_probs(train_counts).log()
    return float(-(val_counts * log_probs).sum() / val_counts.sum())
