"""Tests of pipeline/lm/gpt.py: attention both ways, causality, sizes, sampling, dropout, training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.sizes import (
    GPTConfig,
    activation_bytes,
    parameter_count,
    training_memory_bytes,
)

SMALL = GPTConfig(vocab_size=65, block_size=8, n_layer=3, n_head=4, n_embd=32)
FULL = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)
# Counted by hand from the sizes (see parameter_count); the lecture prints 10.788929 M for FULL.
SMALL_PARAMETERS = 42_369
FULL_PARAMETERS = 10_788_929


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tests are small; one thread avoids thread start-up costs and oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(config: GPTConfig, seed: int = 0) -> GPTLanguageModel:
    torch.manual_seed(seed)
    return GPTLanguageModel(config)


def _tokens(config: GPTConfig, batch: int, time: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, time), generator=generator)


def _perturbed(model: GPTLanguageModel, seed: int = 2) -> GPTLanguageModel:
    """The model with every parameter moved off its init, so that the attention is far from
    uniform and the two paths are compared on weights that matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def test_fast_and_plain_attention_agree_on_logits_and_gradients() -> None:
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32)
    model = _perturbed(_model(config)).eval()
    inputs, targets = _tokens(config, 3, 16, seed=1), _tokens(config, 3, 16, seed=2)

    results = {}
    for fast in (True, False):
        model.set_fast_attention(fast)
        model.zero_grad()
        logits, loss = model(inputs, targets)
        assert loss is not None
        loss.backward()
        gradients = {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
        }
        results[fast] = logits.detach(), gradients

    (fast_logits, fast_gradients), (plain_logits, plain_gradients) = results[True], results[False]
    assert fast_logits.std() > 0.1  # the weights were perturbed enough to matter
    torch.testing.assert_close(fast_logits, plain_logits, atol=1e-5, rtol=0)
    assert fast_gradients.keys() == plain_gradients.keys() == dict(model.named_parameters()).keys()
    for name, gradient in fast_gradients.items():
        torch.testing.assert_close(gradient, plain_gradients[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fast", [True, False])
def test_a_token_changes_no_logits_before_it(fast: bool) -> None:
    model = _perturbed(_model(SMALL)).eval()
    model.set_fast_attention(fast)
    idx = _tokens(SMALL, 2, SMALL.block_size)
    for t in range(SMALL.block_size):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % SMALL.vocab_size
        before, after = model(idx)[0], model(changed)[0]
        torch.testing.assert_close(before[:, :t], after[:, :t], atol=1e-6, rtol=0)
        # ...while the position itself does see the change.
        assert not torch.allclose(before[:, t], after[:, t], atol=1e-4)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SMALL, SMALL_PARAMETERS),
        (FULL, FULL_PARAMETERS),
        (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), None),
        (GPTConfig(vocab_size=10, block_size=3, n_layer=1, n_head=1, n_embd=6), None),
        (GPTConfig(vocab_size=100, block_size=5, n_layer=0, n_head=2, n_embd=8), None),
    ],
)
def test_parameter_count_matches_the_built_model(config: GPTConfig, expected: int | None) -> None:
    assert parameter_count(config) == GPTLanguageModel(config).num_parameters()
    if expected is not None:
        assert parameter_count(config) == expected


def test_initial_loss_is_that_of_uniform_predictions() -> None:
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=64)
    model = _model(config).eval()
    loss = model.batch_loss(_tokens(config, 8, 16, seed=1), _tokens(config, 8, 16, seed=2))
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1


def test_batch_loss_is_forwards_loss() -> None:
    model = _model(SMALL).eval()
    inputs, targets = _tokens(SMALL, 4, 8, seed=1), _tokens(SMALL, 4, 8, seed=2)
    _, loss = model(inputs, targets)
    assert loss is not None
    assert torch.equal(model.batch_loss(inputs, targets), loss)
    assert model(inputs)[1] is None


def test_generate_shape_range_and_determinism() -> None:
    model = _perturbed(_model(SMALL), seed=3)
    prompt = _tokens(SMALL, 3, 5)

    def sample(seed: int, tokens: torch.Tensor = prompt) -> torch.Tensor:
        return model.generate(tokens, 30, generator=torch.Generator().manual_seed(seed))

    out = sample(7)
    assert out.shape == (3, 5 + 30)
    assert out.dtype == prompt.dtype
    assert torch.equal(out[:, :5], prompt)
    assert out.min() >= 0 and out.max() < SMALL.vocab_size
    assert torch.equal(sample(7), out)
    assert not torch.equal(sample(8), out)


def test_generate_crops_a_long_prompt_to_block_size() -> None:
    model = _perturbed(_model(SMALL), seed=3)
    prompt = _tokens(SMALL, 2, 3 * SMALL.block_size)
    long = model.generate(prompt, 12, generator=torch.Generator().manual_seed(5))
    cropped = model.generate(
        prompt[:, -SMALL.block_size :], 12, generator=torch.Generator().manual_seed(5)
    )
    assert long.shape == (2, 3 * SMALL.block_size + 12)
    # Only the last block_size tokens count: the same draws follow either prompt.
    assert torch.equal(long[:, -12:], cropped[:, -12:])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generate_draws_from_the_last_block_size_tokens(temperature: float) -> None:
    """One step of generate is one multinomial draw from softmax(logits / temperature) at the
    last position of the last block_size tokens."""
    model = _perturbed(_model(SMALL), seed=3).eval()
    prompt = _tokens(SMALL, 32, SMALL.block_size + 5)
    out = model.generate(prompt, 1, temperature, generator=torch.Generator().manual_seed(9))
    logits = model(prompt[:, -SMALL.block_size :])[0][:, -1, :]
    probs = torch.softmax(logits / temperature, dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out[:, -1:], expected)


def test_generate_ignores_dropout_and_keeps_the_mode() -> None:
    config = GPTConfig(vocab_size=65, block_size=8, n_layer=2, n_head=4, n_embd=32, dropout=0.5)
    model = _perturbed(_model(config), seed=3).train()
    prompt = _tokens(config, 2, 4)
    first = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # would change dropout's masks, were they drawn
    second = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert model.training
    model.eval()
    assert torch.equal(
        model.generate(prompt, 20, generator=torch.Generator().manual_seed(1)), first
    )
    assert not model.training


def test_a_context_longer_than_block_size_is_refused() -> None:
    model = _model(SMALL)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(_tokens(SMALL, 1, SMALL.block_size + 1))


@pytest.mark.parametrize("fast", [True, False])
def test_dropout_is_random_in_training_only(fast: bool) -> None:
    config = GPTConfig(vocab_size=65, block_size=8, n_layer=2, n_head=4, n_embd=32, dropout=0.2)
    model = _model(config)
    model.set_fast_attention(fast)
    idx = _tokens(config, 2, 8)
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_a_tiny_model_overfits_one_batch() -> None:
    config = GPTConfig(vocab_size=65, block_size=8, n_layer=2, n_head=4, n_embd=32)
    model = _model(config)
    inputs, targets = _tokens(config, 4, 8, seed=1), _tokens(config, 4, 8, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model.batch_loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert model.batch_loss(inputs, targets).item() < 1.0 < math.log(config.vocab_size)


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64),
        GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2),
    ],
)
def test_activation_estimate_covers_what_backward_keeps(config: GPTConfig) -> None:
    """Sum the distinct tensors autograd saves in a plain-path training forward (parameters
    aside): the estimate must cover them, and be no more than 3 times as large."""
    model = _model(config).train()
    model.set_fast_attention(False)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = 4
    idx = _tokens(config, batch, config.block_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.batch_loss(idx, idx)
    kept = sum(saved.values())
    assert kept <= activation_bytes(config, batch) <= 3 * kept


def test_training_memory_counts_four_copies_of_the_parameters() -> None:
    for batch in (1, 64):
        assert training_memory_bytes(FULL, batch) == 16 * FULL_PARAMETERS + activation_bytes(
            FULL, batch
        )
    assert activation_bytes(FULL, 64) == 64 * activation_bytes(FULL, 1)
