"""The GPT of Karpathy's "Let's build GPT" lecture: a decoder-only transformer over characters.

Each token id looks up a token embedding, to which the embedding of its position is added. The
sum goes through n_layer pre-norm blocks; each block adds to its input (a residual connection)
causal multi-head self-attention of its layer-normed input, in which a position attends only to
itself and earlier positions, then adds a position-wise feed-forward layer of the result, again
layer-normed first. A final layer norm and a linear head turn each position into the logits of
the next token. Attention runs through PyTorch's fused kernel (flash attention on a GPU); the
same computation written out as a masked softmax sits beside it for reading and for the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm.sizes import GPTConfig


class CausalSelfAttention(nn.Module):
    """n_head heads of causal self-attention side by side, their outputs concatenated."""

    causal_mask: torch.Tensor

    def __init__(self, config: GPTConfig, use_fast_attention: bool = True) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        # Queries, keys and values of every head in one matmul instead of 3 * n_head small ones.
        # No bias, as the lecture's key, query and value layers.
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # True where position i may attend to position j (j <= i). Non-persistent: it is derived
        # from block_size, so it stays out of the state dict and saved models.
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)
        # The fused kernel is the fast path; plain_attention computes the same numbers.
        self.use_fast_attention = use_fast_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_size): the heads become a batch dimension.
        q, k, v = (
            part.view(batch, time, self.n_head, self.head_size).transpose(1, 2)
            for part in self.qkv(x).split(channels, dim=2)
        )
        if self.use_fast_attention:
            # Never materialises the (T, T) attention matrix on a GPU (flash attention).
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            y = self.plain_attention(q, k, v)
        # Concatenate the heads again: (B, n_head, T, head_size) -> (B, T, C).
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.proj(y))

    def plain_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_size)) v, with each position's later positions masked out."""
        time = q.shape[-2]
        # Dividing by sqrt(head_size) keeps the scores at unit variance, so that the softmax
        # does not saturate towards one-hot at initialisation.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)
        # -inf before the softmax gives the future positions a weight of exactly 0.
        scores = scores.masked_fill(~self.causal_mask[:time, :time], float("-inf"))
        weights = self.attn_dropout(F.softmax(scores, dim=-1))
        return weights @ v


class FeedForward(nn.Module):
    """A per-position MLP: each position thinks about what attention gathered for it."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # The inner layer is 4 times wider, as in "Attention Is All You Need"; ReLU as the lecture.
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward), each on a residual branch."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffwd = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-norm: the residual stream itself is never normalised, so the gradient flows from
        # the loss to the embeddings unchanged through the additions.
        x = x + self.attn(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class GPTLanguageModel(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.n_layer)))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # PyTorch draws embeddings from N(0, 1) and Linear weights at a scale of 1/sqrt(fan_in);
        # a small fixed std instead keeps the initial logits near 0, so that the first loss is
        # close to ln(vocab_size), that of uniform predictions.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_fast_attention(self, enabled: bool) -> None:
        """Use the fused attention kernel (True) or plain_attention (False) in every block."""
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.use_fast_attention = enabled

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The next-token logits (B, T, V) at every position of idx (B, T), T <= block_size."""
        time = idx.shape[1]
        if time > self.config.block_size:
            # There is no position embedding past block_size; generate() crops its context.
            raise ValueError(
                f"a context of {time} tokens exceeds block_size {self.config.block_size}"
            )
        positions = torch.arange(time, device=idx.device)
        x = self.token_embedding_table(idx) + self.position_embedding_table(positions)
        x = self.blocks(self.embedding_dropout(x))
        return self.lm_head(self.ln_f(x))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx and targets are (B, T) token ids; returns logits (B, T, V) and the mean loss."""
        logits = self.logits(idx)
        if targets is None:
            return logits, None
        return logits, _mean_cross_entropy(logits, targets)

    def batch_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """forward()'s mean loss on a (B, T) batch: what the training loop minimises."""
        return _mean_cross_entropy(self.logits(inputs), targets)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        top_k: int = 0,
    ) -> torch.Tensor:
        """Extend each row of idx (B, T) by max_new_tokens sampled tokens; returns (B, T + n).
        With top_k > 0 each draw is among the top_k most likely next tokens only.

        Each step feeds the last block_size tokens back in and samples from the last position's
        distribution. Sampling runs in eval mode (the mode is restored after), so that dropout
        neither blurs the distribution nor draws from the global random generator: a seeded
        generator alone fixes the output.
        """
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.block_size :]
                last_logits = self.logits(context)[:, -1, :] / temperature
                if 0 < top_k < last_logits.shape[-1]:
                    kth = last_logits.topk(top_k, dim=-1).values[:, -1:]
                    last_logits = last_logits.masked_fill(last_logits < kth, float("-inf"))
                probs = F.softmax(last_logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat([idx, next_token], dim=1)
        finally:
            self.train(was_training)
        return idx

    @torch.no_grad()
    def next_token_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """The (V, V) table P[current, next] when the current character is all the context: each
        token alone at position 0. What the GPT learned of bigrams, drawn beside the bigram's."""
        was_training = self.training
        self.eval()
        try:
            tokens = torch.arange(self.config.vocab_size, device=self.lm_head.weight.device)
            logits = self.logits(tokens.unsqueeze(1))[:, 0, :]
            return F.softmax(logits / temperature, dim=-1)
        finally:
            self.train(was_training)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())


def _mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # cross_entropy wants the classes in dimension 1: flatten (B, T, V) to (B*T, V).
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def sliding_window_loss(model: GPTLanguageModel, tokens: torch.Tensor, stride: int = 1) -> float:
    """The mean loss over every target tokens[1:], each counted exactly once.

    Windows of block_size inputs start at 0, stride, 2 * stride, ...; the first window counts
    all its targets, each later one only its last ``stride``, which the windows before did not
    reach, and one last window ending at the end of the text counts what the others left. At
    stride 1 a target at position j is predicted from min(j, block_size) characters, all the
    context the model can use: the number has no sampling noise and no short-context bias. A
    larger stride costs stride times less and gives each target between block_size - stride + 1
    and block_size characters (the first window's from 1).
    """
    tokens = tokens.long()  # token files are kept narrow (uint8); embeddings take int64
    was_training = model.training
    model.eval()
    try:
        block_size = min(model.config.block_size, len(tokens) - 1)
        windows = tokens.unfold(0, block_size + 1, stride)  # inputs, then the last target
        total, counted = 0.0, 0

        def add(chunk: torch.Tensor, last: int) -> None:
            nonlocal total, counted
            logits = model.logits(chunk[:, :-1])[:, -last:]
            targets = chunk[:, -last:]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += loss.item()
            counted += targets.numel()

        add(windows[:1], block_size)
        # About 16k positions per forward pass: the activations stay in a CPU's caches, which
        # runs 1.3x (baby GPT) to 1.4x (small GPT) as many positions a second as 64k would.
        windows_per_batch = max(1, 16_384 // block_size)
        for begin in range(1, len(windows), windows_per_batch):
            add(windows[begin : begin + windows_per_batch], stride)
        left = len(tokens) - 1 - counted
        if left > 0:
            add(tokens[-(block_size + 1) :].unsqueeze(0), left)
        return total / counted
    finally:
        model.train(was_training)
