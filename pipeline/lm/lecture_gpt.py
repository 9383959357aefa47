"""The lecture's GPT (ng-video-lecture gpt.py), written anew: the readable reference for the GPT.

The benchmarks time the pipeline's GPT loop against this one, and a test checks that it computes
what pipeline/lm/gpt.py computes (``copy_weights_from`` maps one model's weights onto the other).
No stage imports it.

It keeps what the pipeline's GPT improves on: one module per attention head, each with its own
key, query and value layers (3 * n_head small matmuls per block instead of one), attention as
a masked softmax always, batches stacked row by row in Python (pipeline/lm/lecture.py's), and
``estimate_loss`` from 200 random batches per split with a host read per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm import gpt
from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.sizes import GPTConfig

EVAL_ITERS = 200


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


def stacked_batch(tokens: torch.Tensor, batch_size: int, block_size: int):
    """(B, T) inputs and targets, one Python slice per row, from the global generator."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,))
    inputs = torch.stack([tokens[start : start + block_size] for start in starts])
    targets = torch.stack([tokens[start + 1 : start + block_size + 1] for start in starts])
    return inputs, targets


def train_steps(
    model: ReferenceGPT,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int,
) -> None:
    for _ in range(steps):
        inputs, targets = stacked_batch(tokens, batch_size, model.config.block_size)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def estimate_loss(
    model: ReferenceGPT,
    splits: dict[str, torch.Tensor],
    batch_size: int,
    eval_iters: int = EVAL_ITERS,
) -> dict[str, float]:
    """Mean loss over eval_iters random batches per split, each loss read back to the host."""
    model.eval()
    estimates = {}
    for name, tokens in splits.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            _, loss = model(*stacked_batch(tokens, batch_size, model.config.block_size))
            losses[k] = loss.item()
        estimates[name] = losses.mean().item()
    model.train()
    return estimates


def train_with_estimates(
    model: ReferenceGPT,
    splits: dict[str, torch.Tensor],
    max_iters: int,
    eval_interval: int,
    batch_size: int,
    lr: float,
    eval_iters: int = EVAL_ITERS,
) -> list[dict[str, float]]:
    """gpt.py's loop: AdamW, an estimate every eval_interval steps and after the last one."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    estimates = []
    for step in range(0, max_iters, eval_interval):
        estimates.append(estimate_loss(model, splits, batch_size, eval_iters))
        train_steps(
            model, optimizer, splits["train"], min(eval_interval, max_iters - step), batch_size
        )
    estimates.append(estimate_loss(model, splits, batch_size, eval_iters))
    return estimates
