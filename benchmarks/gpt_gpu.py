"""The full GPT on a GPU, for `make gpu-check`: tokens/s and MFU three ways, then a full-size run.

The lecture's gpt.py size (6 layers, 6 heads, n_embd 384, block 256, batch 64, dropout 0.2,
AdamW at 3e-4) trained by the pipeline's own loop (pipeline.lm.training.train_minibatch):

- eager float32, then under bf16 autocast, then bf16 with the model's forward compiled by
  torch.compile (a compile that fails falls back to the eager path, and the row says so);
- MFU: model FLOPs per second (6 N + 12 L T C per token: forward and backward of the weights,
  and the attention scores, as in the PaLM paper's appendix B) over the GPU's dense bf16 peak;
- then the lecture's 5000 steps at the fastest setting, or as many as fit in --gpt-seconds, with
  the estimate of 200 batches and the exact val loss (sliding windows) at the end.

Device-agnostic: tests run it on the CPU at a tiny size (no compile there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from benchmarks.measure import Row
from benchmarks.workload import Workload
from pipeline.lm.gpt import GPTLanguageModel, sliding_window_loss
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.sizes import GPTConfig
from pipeline.lm.training import estimated_losses, train_minibatch
from pipeline.params import TrainParams

# Dense bf16 tensor-core peaks, FLOP/s, by a word of the device's name (the vendors' sheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
FULL_VAL_GOAL = 1.48


def full_gpt(vocab_size: int) -> tuple[GPTConfig, TrainParams]:
    """The lecture's gpt.py: its model and its training params."""
    config = GPTConfig(vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)
    train = lecture_train_params(
        batch_size=64, block_size=256, max_iters=5000, eval_interval=500, lr=3e-4, eval_iters=200
    )
    return config, train


def flops_per_token(model: GPTLanguageModel) -> float:
    config = model.config
    attention = 12 * config.n_layer * config.block_size * config.n_embd
    return 6 * model.num_parameters() + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for word, peak in PEAK_BF16_FLOPS.items() if word in name), None)


@contextlib.contextmanager
def precision(device: torch.device, bf16: bool) -> Iterator[None]:
    if bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def compiled(model: GPTLanguageModel) -> tuple[GPTLanguageModel, str]:
    """The model with its logits compiled, or as it was and why not. The loop calls
    batch_loss, which calls logits: compiling that one method compiles the whole forward."""
    try:
        logits = torch.compile(model.logits)
        sample = torch.zeros((1, model.config.block_size), dtype=torch.long)
        logits(sample.to(model.lm_head.weight.device))  # compile now, not inside a timing
    except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
        return model, f"eager (torch.compile failed: {str(error).splitlines()[0][:80]})"
    model.logits = logits  # type: ignore[method-assign]
    return model, "compiled"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(config: GPTConfig, train: TrainParams, device: torch.device) -> GPTLanguageModel:
    torch.manual_seed(train.seed)
    return GPTLanguageModel(config).to(device)


def tokens_per_second(
    work: Workload,
    config: GPTConfig,
    train: TrainParams,
    device: torch.device,
    steps: int,
    bf16: bool,
    compile_model: bool,
) -> tuple[float, str]:
    """Training tokens/s of `steps` steps (after as many warm-up steps), and how it ran."""
    tokens = work.train_tokens.to(device)
    model = new_model(config, train, device)
    how = "eager"
    if compile_model:
        model, how = compiled(model)
    run = dataclasses.replace(train, max_iters=steps, eval_interval=steps)
    seconds = []
    with precision(device, bf16):
        for _ in range(2):  # the first pass pays kernel selection and autotuning
            synchronize(device)
            started = time.perf_counter()
            train_minibatch(model, tokens, run, lambda step: None, tqdm(disable=True))
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    return steps * train.batch_size * train.block_size / seconds[-1], how


def throughput_rows(
    work: Workload, config: GPTConfig, train: TrainParams, device: torch.device, steps: int
) -> tuple[list[Row], dict[str, bool]]:
    """The three settings' rows, and the settings of the fastest."""
    settings = {
        "float32, eager": {"bf16": False, "compile_model": False},
        "bf16 autocast, eager": {"bf16": True, "compile_model": False},
        "bf16 autocast, torch.compile": {"bf16": True, "compile_model": device.type == "cuda"},
    }
    flops = flops_per_token(new_model(config, train, torch.device("cpu")))
    peak = peak_flops(device)
    rows, rates = [], {}
    for name, setting in settings.items():
        rate, how = tokens_per_second(work, config, train, device, steps, **setting)
        rates[name] = rate
        mfu = f"MFU {rate * flops / peak:.1%}" if peak else "MFU: peak unknown"
        rows.append(
            Row(
                "GPU full GPT",
                f"tokens/s, {name} ({how}), {steps} steps of {train.batch_size} x "
                f"{train.block_size}",
                f"{rates['float32, eager']:,.0f}",
                f"{rate:,.0f}; {mfu}",
                f"{rate / rates['float32, eager']:.2f}x",
            )
        )
    fastest = max(rates, key=rates.__getitem__)
    return rows, settings[fastest]


def full_run_rows(
    work: Workload,
    config: GPTConfig,
    train: TrainParams,
    device: torch.device,
    seconds_budget: float,
    setting: dict[str, bool],
    probe_steps: int = 50,
) -> list[Row]:
    """The lecture's run at the fastest setting: all its steps if they fit the budget (timed
    from a probe), else the most that do; then the estimate and the exact val loss."""
    rate_tokens, _ = tokens_per_second(work, config, train, device, probe_steps, **setting)
    step_s = train.batch_size * train.block_size / rate_tokens
    steps = max(probe_steps, min(train.max_iters, int(seconds_budget / (step_s * 1.15))))
    run = dataclasses.replace(train, max_iters=steps, eval_interval=max(1, steps // 10))
    tokens = work.train_tokens.to(device)
    val = work.val_tokens.to(device)
    model = new_model(config, train, device)
    if setting["compile_model"]:
        model, _ = compiled(model)
    estimates: dict[int, tuple[float, float]] = {}
    evaluate: Callable[[int], None] = lambda step: estimates.update(  # noqa: E731
        {step: estimated_losses(model, tokens, val, run)}
    )
    started = time.perf_counter()
    with precision(device, setting["bf16"]):
        train_minibatch(model, tokens, run, evaluate, tqdm(disable=True))
        exact_val = sliding_window_loss(model, val, stride=config.block_size // 8)
    synchronize(device)
    wall_s = time.perf_counter() - started
    train_estimate, val_estimate = estimates[steps]
    return [
        Row(
            "GPU full GPT",
            f"the lecture's run, {steps} of {train.max_iters} steps "
            f"({'bf16' if setting['bf16'] else 'fp32'}"
            f"{', compiled' if setting['compile_model'] else ''}): wall",
            "",
            f"{wall_s:.0f} s",
        ),
        Row(
            "GPU full GPT",
            "val loss: estimate (200 batches) / exact (every target); train estimate",
            "lecture ~1.48",
            f"{val_estimate:.4f} / {exact_val:.4f}; {train_estimate:.4f}",
            "",
            f"val <= {FULL_VAL_GOAL} at 5000 steps",
            (val_estimate <= FULL_VAL_GOAL) if steps == train.max_iters else None,
        ),
    ]
