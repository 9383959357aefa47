"""A GPT's sizes and what they cost, from the sizes alone: no torch, so the check stage can
refuse a model that cannot fit before DVC removes any output.

``GPTConfig`` is the architecture of pipeline.lm.gpt.GPTLanguageModel; ``parameter_count`` and
``training_memory_bytes`` are what it takes to train it, in closed form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.params import Params


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # the longest context, in tokens
    n_layer: int
    n_head: int
    n_embd: int  # a multiple of n_head: each head gets n_embd // n_head channels
    dropout: float = 0.0


def parameter_count(config: GPTConfig) -> int:
    """The number of parameters of GPTLanguageModel(config), from the sizes alone."""
    c, v = config.n_embd, config.vocab_size
    embeddings = v * c + config.block_size * c
    attention = c * 3 * c + (c * c + c)  # qkv (no bias), then the output projection
    feed_forward = (c * 4 * c + 4 * c) + (4 * c * c + c)
    layer_norm = 2 * c  # a weight and a bias
    block = attention + feed_forward + 2 * layer_norm  # 12 c^2 + 10 c
    head = layer_norm + (c * v + v)  # the final layer norm, then the linear head
    return embeddings + config.n_layer * block + head


# Activations one block keeps for backward, in multiples of B*T*n_embd floats: its input, ln1's
# output, q, k and v, the attention output, the projection's output, the residual sum, ln2's
# output, the feed-forward layer's 4*n_embd-wide hidden layer before and after the ReLU (4 + 4)
# and its output: 18, rounded up to 20 for dropout masks and layer-norm statistics.
_BLOCK_ACTIVATIONS_PER_CHANNEL = 20
# The plain path keeps the attention scores, their softmax and its dropout: 3 (T, T) per head.
_ATTENTION_MATRICES = 3
# The logits, their log-softmax and the gradient of the loss with respect to them.
_LOGIT_COPIES = 3
_FLOAT32_BYTES = 4


def activation_bytes(config: GPTConfig, batch_size: int) -> int:
    """A conservative estimate of the float32 activations one training step keeps for backward.

    With B = batch_size, T = block_size, C = n_embd, H = n_head and V = vocab_size, it counts
    4 bytes times

        n_layer * (20 * B*T*C + 3 * B*H*T*T)   the blocks (see _BLOCK_ACTIVATIONS_PER_CHANNEL)
        + 2 * B*T*C                            the embeddings' sum and the final layer norm
        + 3 * B*T*V                            the logits, their log-softmax and its gradient.

    The attention matrices are counted as the plain path keeps them; flash attention on a GPU
    keeps none, so the figure is an upper bound there.
    """
    b, t, c = batch_size, config.block_size, config.n_embd
    per_block = (
        _BLOCK_ACTIVATIONS_PER_CHANNEL * b * t * c + _ATTENTION_MATRICES * b * config.n_head * t * t
    )
    floats = config.n_layer * per_block + 2 * b * t * c + _LOGIT_COPIES * b * t * config.vocab_size
    return _FLOAT32_BYTES * floats


def training_memory_bytes(config: GPTConfig, batch_size: int) -> int:
    """A conservative estimate of the bytes one float32 AdamW training step needs.

    4 bytes for each parameter, its gradient and AdamW's two moments (4 copies of the
    parameters), plus activation_bytes(config, batch_size). It ignores the allocator's slack and
    the framework's own memory (a CUDA context is several hundred MB): it is meant for refusing,
    with a one-line error before training, a size that cannot fit, not for a budget to the byte.
    """
    return 4 * _FLOAT32_BYTES * parameter_count(config) + activation_bytes(config, batch_size)


def gpt_config(params: Params, vocab_size: int) -> GPTConfig:
    """The GPT that params.yaml's model section describes, with train.block_size as its context."""
    model = params.model
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=params.train.block_size,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        dropout=model.dropout,
    )


def machine_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(
    params: Params, vocab_size: int, memory_bytes: int | None, where: str = "this machine"
) -> None:
    """Refuse, before any training, a GPT whose training step cannot fit in memory_bytes."""
    if params.model.type != "gpt" or memory_bytes is None:
        return
    config = gpt_config(params, vocab_size)
    needed = training_memory_bytes(config, params.train.batch_size)
    if needed > memory_bytes:
        model = params.model
        raise PipelineError(
            f"param 'model.n_embd' = {model.n_embd} with model.n_layer = {model.n_layer}, "
            f"train.block_size = {params.train.block_size} and train.batch_size = "
            f"{params.train.batch_size} needs about {needed / 1e9:.1f} GB to train "
            f"({parameter_count(config):,} parameters, their gradients, AdamW's moments and the "
            f"activations), above the {memory_bytes / 1e9:.1f} GB of {where}; lower one of them"
        )
