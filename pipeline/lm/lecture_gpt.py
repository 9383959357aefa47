"""The lecture's GPT (ng-video-lecture gpt.py), written anew: the readable reference for the GPT.

The benchmarks time the pipeline's GPT loop against this one, and a test checks that it computes
what pipeline/lm/gpt.py computes (``copy_weights_from`` maps one model's weights onto the other).
No stage imports it.

It keeps what the pipeline's GPT improves on: one module per attention head, each with its own
key, query and value layers (3 * n_head small matmuls per block instead of one), and attention
as a masked softmax always. It trains and is estimated by pipeline/lm/lecture.py's loop
(``train_steps``, ``estimate_loss``: batches stacked row by row in Python, a host read per
estimated batch), given the GPT's batch and block sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm import gpt
from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.sizes import GPTConfig


class Head(nn.Module):
    """One head of causal self-attention."""

    tril: torch.Tensor

    def __init__(self, config: GPTConfig, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=False)
        self.query = nn.Linear(config.n_embd, head_size, bias=False)
        self.value = nn.Linear(config.n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time = x.shape[1]
        k, q = self.key(x), self.query(x)
        scores = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        scores = scores.masked_fill(self.tril[:time, :time] == 0, float("-inf"))
        return self.dropout(F.softmax(scores, dim=-1)) @ self.value(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        head_size = config.n_embd // config.n_head
        self.heads = nn.ModuleList(Head(config, head_size) for _ in range(config.n_head))
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(torch.cat([head(x) for head in self.heads], dim=-1)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = config.n_embd
        self.sa = MultiHeadAttention(config)
        self.ffwd = nn.Sequential(
            nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c), nn.Dropout(config.dropout)
        )
        self.ln1 = nn.LayerNorm(c)
        self.ln2 = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.n_layer)))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        time = idx.shape[1]
        positions = self.position_embedding_table(torch.arange(time, device=idx.device))
        logits = self.lm_head(self.ln_f(self.blocks(self.token_embedding_table(idx) + positions)))
        if targets is None:
            return logits, None
        flat = logits.view(-1, logits.shape[-1])
        return flat, F.cross_entropy(flat, targets.view(-1))

    @torch.no_grad()
    def copy_weights_from(self, model: GPTLanguageModel) -> None:
        """Take the pipeline GPT's weights: its fused qkv rows split into each head's layers."""
        source = model.state_dict()
        target = {"token_embedding_table", "position_embedding_table", "ln_f", "lm_head"}
        for name, tensor in source.items():
            if name.split(".")[0] in target:
                self.state_dict()[name].copy_(tensor)
        head_size = self.config.n_embd // self.config.n_head
        for block, theirs in zip(self.blocks, model.blocks, strict=True):
            assert isinstance(block, Block) and isinstance(theirs, gpt.Block)
            queries, keys, values = theirs.attn.qkv.weight.split(self.config.n_embd)
            for h, head in enumerate(block.sa.heads):
                assert isinstance(head, Head)
                rows = slice(h * head_size, (h + 1) * head_size)
                head.query.weight.copy_(queries[rows])
                head.key.weight.copy_(keys[rows])
                head.value.weight.copy_(values[rows])
            block.sa.proj.load_state_dict(theirs.attn.proj.state_dict())
            block.ffwd.load_state_dict(theirs.ffwd.net.state_dict())
            block.ln1.load_state_dict(theirs.ln1.state_dict())
            block.ln2.load_state_dict(theirs.ln2.state_dict())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
