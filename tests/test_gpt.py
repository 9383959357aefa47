"""The GPT (pipeline/lm/gpt.py): attention both ways, causality, sizes, sampling, dropout, training;
and its place in the pipeline: exact losses, model files, the schedule, params, text."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.gpt import GPTLanguageModel, sliding_window_loss
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.lecture_gpt import ReferenceGPT
from pipeline.lm.models import load_model, save_model
from pipeline.lm.sampling import TextGenerator
from pipeline.lm.sizes import (
    GPTConfig,
    activation_bytes,
    check_model_fits,
    parameter_count,
    training_memory_bytes,
)
from pipeline.lm.training import learning_rate
from pipeline.params import load_params
from tests.support.params import load_error, write_params

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


def test_the_lecture_gpt_computes_what_ours_does_with_the_same_weights() -> None:
    # The benchmarks' lecture-style loop is a fair peer only if it is the same function.
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32)
    ours = _perturbed(_model(config)).eval()
    lecture = ReferenceGPT(config).eval()
    lecture.copy_weights_from(ours)
    inputs, targets = _tokens(config, 3, 16, seed=1), _tokens(config, 3, 16, seed=2)

    our_logits, our_loss = ours(inputs, targets)
    lecture_logits, lecture_loss = lecture(inputs, targets)

    assert our_logits.std() > 0.1
    torch.testing.assert_close(lecture_logits, our_logits.view(-1, 65), atol=1e-5, rtol=0)
    torch.testing.assert_close(lecture_loss, our_loss, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in lecture.parameters()) == ours.num_parameters()


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


# The GPT in the pipeline: exact losses, files, schedule, params, text ----------------------------


def _per_target_losses(model: GPTLanguageModel, tokens: torch.Tensor, context: int) -> list[float]:
    """Each target tokens[j] (j >= 1) predicted, one forward pass each, from the min(j, context)
    tokens before it: what sliding_window_loss must add up."""
    losses = []
    for j in range(1, len(tokens)):
        inputs = tokens[max(0, j - context) : j].unsqueeze(0)
        logits = model.logits(inputs)[0, -1]
        losses.append(torch.nn.functional.cross_entropy(logits, tokens[j]).item())
    return losses


def test_the_sliding_window_loss_counts_every_target_once_with_its_whole_context() -> None:
    config = GPTConfig(vocab_size=11, block_size=5, n_layer=1, n_head=2, n_embd=8)
    model = _perturbed(_model(config)).eval()
    tokens = _tokens(config, 1, 23, seed=4)[0].to(torch.uint8)  # as the token files hold them
    expected = _per_target_losses(model, tokens.long(), config.block_size)
    assert sliding_window_loss(model, tokens) == pytest.approx(
        sum(expected) / len(expected), rel=1e-6
    )
    # A wider stride: each target still counted once, from at least block_size - stride + 1.
    strided = sliding_window_loss(model, tokens, stride=3)
    assert strided != pytest.approx(sliding_window_loss(model, tokens), rel=1e-9)
    assert math.isfinite(strided)


def test_a_saved_gpt_gives_the_same_bytes_and_loads_as_the_same_model(tmp_path) -> None:
    config = GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.1)
    model = _perturbed(_model(config)).eval()
    save_model(model, tmp_path / "a.pt")
    save_model(model, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()

    loaded = load_model(tmp_path / "a.pt", vocab_size=13)
    assert isinstance(loaded, GPTLanguageModel) and loaded.config == config
    inputs = _tokens(config, 2, 6)
    assert torch.equal(loaded.eval().logits(inputs), model.logits(inputs))

    with pytest.raises(PipelineError, match=r"a GPT of a vocabulary of 13 characters but the "):
        load_model(tmp_path / "a.pt", vocab_size=12)


def test_the_cosine_schedule_warms_up_then_decays_to_a_tenth() -> None:
    config = lecture_train_params(lr=1e-3, max_iters=101, lr_schedule="cosine", warmup_iters=10)
    assert learning_rate(0, config) == pytest.approx(1e-3 / 11)
    assert learning_rate(9, config) == pytest.approx(1e-3 * 10 / 11)
    assert learning_rate(10, config) == pytest.approx(1e-3)
    assert learning_rate(100, config) == pytest.approx(1e-4)
    rates = [learning_rate(i, config) for i in range(10, 101)]
    assert rates == sorted(rates, reverse=True)
    assert learning_rate(50, lecture_train_params(lr=3e-3)) == 3e-3  # constant: the lecture's


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model.type": "gpt", "model.n_embd": 30, "model.n_head": 4},
            "param 'model.n_embd' must be a multiple of model.n_head = 4 (each head gets "
            "n_embd / n_head channels), got 30",
        ),
        (
            {"model.type": "gpt", "train.method": "counts"},
            "param 'train.method' must be minibatch for model.type gpt (counts fits a bigram's "
            "table), got 'counts'",
        ),
        ({"model.type": "lstm"}, "param 'model.type' must be one of ('bigram', 'gpt'), got 'lstm'"),
        ({"train.lr_schedule": "step"}, "param 'train.lr_schedule' must be one of"),
        ({"train.warmup_iters": 5000}, "param 'train.warmup_iters' must be below train.max_iters"),
        ({"sample.top_k": -1}, "param 'sample.top_k' must be an integer >= 0 (0: off), got -1"),
        ({"train.threads": 0}, "param 'train.threads' must be a positive integer, got 0"),
    ],
)
def test_a_bad_model_param_is_one_line_naming_it(tmp_path, overrides, message) -> None:
    path = write_params(tmp_path, **overrides)
    assert load_error(path).startswith(f"{path}: {message}")


def test_a_gpt_too_large_for_memory_is_refused_before_training(tmp_path) -> None:
    params = load_params(
        write_params(tmp_path, **{"model.type": "gpt", "model.n_embd": 8192, "model.n_layer": 64})
    )
    with pytest.raises(PipelineError) as refused:
        check_model_fits(params, vocab_size=65, memory_bytes=24 * 10**9)
    message = str(refused.value)
    assert message.startswith("param 'model.n_embd' = 8192 with model.n_layer = 64, ")
    assert "GB to train" in message and "above the 24.0 GB of this machine" in message
    check_model_fits(load_params(write_params(tmp_path, **{"model.type": "gpt"})), 65, 10**9)


def test_text_from_a_gpt_continues_the_prompts_last_block_of_characters(tmp_path) -> None:
    chars = [chr(ord("a") + i) for i in range(11)]
    config = GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8)
    model = _perturbed(_model(config)).eval()
    defaults = load_params(write_params(tmp_path)).sample
    text = TextGenerator(model, chars, defaults).generate("abcdefg", 12, 1.0, seed=5)

    context = torch.tensor([[3, 4, 5, 6]])  # "defg": the last block_size characters
    tokens = model.generate(context, 12, generator=torch.Generator().manual_seed(5))
    assert text == "abcdefg" + "".join(chars[i] for i in tokens[0, 4:].tolist())


def test_top_k_one_is_greedy_for_either_model_whatever_the_seed(tmp_path) -> None:
    chars = [chr(ord("a") + i) for i in range(11)]
    defaults = load_params(write_params(tmp_path)).sample
    gpt = _perturbed(_model(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8)))
    torch.manual_seed(0)
    bigram = BigramLanguageModel(11)
    for model in (gpt.eval(), bigram):
        generator = TextGenerator(model, chars, defaults)
        texts = {generator.generate("abc", 20, 1.0, seed, top_k=1) for seed in (1, 2, 3)}
        assert len(texts) == 1, model
        assert len({generator.generate("abc", 20, 1.0, seed) for seed in (1, 2, 3)}) == 3
    # The bigram's greedy text follows the argmax of each character's row.
    text = TextGenerator(bigram, chars, defaults).generate("a", 10, 1.0, seed=1, top_k=1)
    best_next = bigram.next_token_probs().argmax(dim=-1).tolist()
    assert all(
        chars.index(after) == best_next[chars.index(before)]
        for before, after in zip(text, text[1:], strict=False)
    )


def test_the_gpu_checks_gpt_part_runs_at_a_tiny_size_on_the_cpu(shakespeare_corpus) -> None:
    """`make gpu-check`'s GPT rows (benchmarks/gpt_gpu.py) run where a GPU is lent for minutes:
    the code path is proven here, on the CPU (no compile), at a size that trains in seconds."""
    from benchmarks import gpt_gpu
    from benchmarks.workload import load_workload

    work = load_workload(shakespeare_corpus)
    full, train = gpt_gpu.full_gpt(work.vocab_size)
    assert (full.n_layer, full.n_head, full.n_embd, full.block_size, full.dropout) == (
        6,
        6,
        384,
        256,
        0.2,
    )
    tiny = GPTConfig(work.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.2)
    tiny_train = lecture_train_params(
        batch_size=4, block_size=16, max_iters=60, eval_interval=20, lr=3e-3, eval_iters=2
    )
    cpu = torch.device("cpu")
    rows, fastest = gpt_gpu.throughput_rows(work, tiny, tiny_train, cpu, steps=5)
    assert [row.measure.split(" (")[0] for row in rows] == [
        "tokens/s, float32, eager",
        "tokens/s, bf16 autocast, eager",
        "tokens/s, bf16 autocast, torch.compile",
    ]
    assert all(float(row.ours.split(";")[0].replace(",", "")) > 0 for row in rows)
    assert fastest["compile_model"] is False  # never compiled on a CPU
    (wall, losses) = gpt_gpu.full_run_rows(work, tiny, tiny_train, cpu, 1e9, fastest, 5)
    assert wall.measure.startswith("the lecture's run, 60 of 60 steps")
    estimate, exact = (float(x) for x in losses.ours.split(";")[0].split(" / "))
    assert 2.0 < exact < 4.0 and 2.0 < estimate < 4.0  # it learned something, not everything
