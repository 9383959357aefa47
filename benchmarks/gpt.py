"""Targets 11 and 12: the GPT's training speed against its peers, and what tracking costs it.

11. tokens per second of the small and baby GPTs' loop against the lecture's gpt.py loop
    (pipeline/lm/lecture_gpt.py: a module per head, Python-stacked batches, an estimate read
    back batch by batch) and against a plain loop of the same model with AdamW (nanoGPT's way:
    one forward and backward per step, nothing else), at each torch thread count up to 2;
12. the tracking overhead of each CPU step of the ladder: a real `dvc exp run` in a throwaway
    copy of the repo, minus its training and evaluation loops, timed in this process with the
    same params (the loops are deterministic work: the same in a stage as here).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.measure import Row, fmt_seconds, interleaved_medians, run_child
from benchmarks.stages import child_env
from benchmarks.workload import Workload
from pipeline.lm import lecture, lecture_gpt
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.gpt import GPTLanguageModel
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.models import LanguageModel
from pipeline.lm.sizes import GPTConfig
from pipeline.lm.tokens import get_batch
from pipeline.lm.training import estimated_losses, exact_losses, train_minibatch
from pipeline.params import TrainParams
from pipeline.stages import evaluate
from testbed import make_repo_copy

MIN_LECTURE_RATIO = 1.5
MIN_PLAIN_RATIO = 1.0
MAX_OVERHEAD_SHARE = 0.10  # at the baby GPT


@dataclass(frozen=True)
class LadderStep:
    """A CPU step of docs/LADDER.md: its -S overrides, and the same as the loop's params."""

    name: str
    overrides: dict[str, str]

    def train_params(self, scale: float = 1.0) -> TrainParams:
        train = {
            key.removeprefix("train."): value
            for key, value in self.overrides.items()
            if key.startswith("train.")
        }
        return scaled(lecture_train_params(**{k: _typed(k, v) for k, v in train.items()}), scale)

    def gpt_config(self, vocab_size: int) -> GPTConfig | None:
        if self.overrides.get("model.type") != "gpt":
            return None
        model = {k.removeprefix("model."): v for k, v in self.overrides.items()}
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=int(self.overrides.get("train.block_size", 8)),
            n_layer=int(model.get("n_layer", 3)),
            n_head=int(model.get("n_head", 4)),
            n_embd=int(model.get("n_embd", 32)),
        )


TRAIN_FIELDS = {field.name: field for field in dataclasses.fields(TrainParams)}
SMALL = {
    "model.type": "gpt",
    "train.lr": "1e-3",
    "train.max_iters": "5000",
    "train.eval_interval": "500",
}
BABY = {
    "model.type": "gpt",
    "model.n_layer": "4",
    "model.n_head": "4",
    "model.n_embd": "128",
    "train.block_size": "64",
    "train.batch_size": "12",
    "train.max_iters": "2000",
    "train.eval_interval": "250",
    "train.lr": "1e-3",
    "train.eval_iters": "20",
}
LADDER = (
    LadderStep("bigram", {}),
    LadderStep("small GPT", SMALL),
    LadderStep("baby GPT", BABY),
)


def _typed(name: str, value: str) -> int | float | str:
    """A -S value as the train param's type (annotations are strings here: "int", "float")."""
    kind = str(TRAIN_FIELDS[name].type)
    return int(value) if kind == "int" else float(value) if kind == "float" else value


def scaled(params: TrainParams, scale: float) -> TrainParams:
    """The same loop over a fraction of its steps, with as many eval points."""
    if scale == 1.0:
        return params
    max_iters = max(1, round(params.max_iters * scale))
    eval_interval = max(1, round(params.eval_interval * scale))
    return dataclasses.replace(params, max_iters=max_iters, eval_interval=eval_interval)


def no_progress() -> tqdm:
    return tqdm(disable=True)


def training_rows(work: Workload, quick: bool, repeats: int) -> list[Row]:
    """Target 11 at each thread count up to 2, restoring this process's count after."""
    threads_before = torch.get_num_threads()
    thread_counts = [1, 2] if _cores() > 1 else [1]
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for step in LADDER[1:]:
                rows += _throughput_rows(work, step, threads, quick, repeats)
    finally:
        torch.set_num_threads(threads_before)
    return rows


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _throughput_rows(
    work: Workload, step: LadderStep, threads: int, quick: bool, repeats: int
) -> list[Row]:
    # One eval interval of the ladder step: its training steps and one estimate before them, the
    # share of estimating that the whole run has.
    full = step.train_params()
    steps = max(20, full.eval_interval // (5 if quick else 1))
    config = dataclasses.replace(full, max_iters=steps, eval_interval=steps)
    gpt = step.gpt_config(work.vocab_size)
    assert gpt is not None
    tokens_per_run = steps * config.batch_size * config.block_size
    splits = {"train": work.reference_train, "val": work.reference_val}

    def lecture_loop() -> None:
        torch.manual_seed(config.seed)
        model = lecture_gpt.ReferenceGPT(gpt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        sizes = {"batch_size": config.batch_size, "block_size": config.block_size}
        lecture.estimate_loss(model, splits, config.eval_iters, **sizes)
        lecture.train_steps(model, optimizer, work.reference_train, steps, **sizes)

    def our_loop() -> None:
        model = _new_gpt(gpt, config)
        estimated_losses(model, work.train_tokens, work.val_tokens, config)
        train_minibatch(model, work.train_tokens, config, lambda step: None, no_progress())

    def plain_steps() -> None:
        model = _new_gpt(gpt, config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(steps):
            inputs, targets = get_batch(
                work.train_tokens, config.batch_size, config.block_size, generator
            )
            _, loss = model(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            assert loss is not None
            loss.backward()
            optimizer.step()

    def our_steps() -> None:
        model = _new_gpt(gpt, config)
        train_minibatch(model, work.train_tokens, config, lambda step: None, no_progress())

    # First runs pay one-off costs (AdamW's first use imports torch._dynamo).
    for warm_up in (lecture_loop, our_loop, plain_steps, our_steps):
        warm_up()
    medians = interleaved_medians(
        {"lecture": lecture_loop, "ours": our_loop, "plain": plain_steps, "our_steps": our_steps},
        repeats,
    )
    rate = {name: tokens_per_run / seconds for name, seconds in medians.items()}
    label = f"{step.name}, {threads} thread{'s' if threads > 1 else ''}"
    lecture_ratio = rate["ours"] / rate["lecture"]
    plain_ratio = rate["our_steps"] / rate["plain"]
    return [
        Row(
            "11 gpt training",
            f"{label}: tokens/s, {steps} steps + an estimate of {config.eval_iters} batches, "
            "vs the lecture's loop",
            f"{rate['lecture']:,.0f}",
            f"{rate['ours']:,.0f}",
            f"{lecture_ratio:.2f}x",
            f">= {MIN_LECTURE_RATIO:g}x",
            lecture_ratio >= MIN_LECTURE_RATIO,
        ),
        Row(
            "11 gpt training",
            f"{label}: tokens/s, {steps} steps, vs a plain AdamW loop of the same model",
            f"{rate['plain']:,.0f}",
            f"{rate['our_steps']:,.0f}",
            f"{plain_ratio:.2f}x",
            f">= {MIN_PLAIN_RATIO:g}x",
            plain_ratio >= MIN_PLAIN_RATIO,
        ),
    ]


def _new_gpt(config: GPTConfig, train: TrainParams) -> GPTLanguageModel:
    torch.manual_seed(train.seed)
    return GPTLanguageModel(config)


def overhead_rows(
    work: Workload, corpus: Path, scratch: Path, threads: int, quick: bool
) -> list[Row]:
    """Target 12: at each CPU step of the ladder, the real `dvc exp run` (a `dvc repro` for the
    bigram) against its loops alone. Quick: a tenth of each step's training."""
    scale = 0.1 if quick else 1.0
    env = child_env(corpus, threads)
    repo = make_repo_copy(scratch / "ladder", env)
    rows = []
    for step in LADDER:
        overrides = dict(step.overrides)
        if scale != 1.0:
            params = step.train_params(scale)
            overrides.update(
                {
                    "train.max_iters": str(params.max_iters),
                    "train.eval_interval": str(params.eval_interval),
                }
            )
        command = (
            ["dvc", "repro"] if not overrides else ["dvc", "exp", "run", "-n", _slug(step.name)]
        )
        for key, value in overrides.items():
            command += ["-S", f"{key}={value}"]
        wall_s = run_child(command, repo, env, timeout_s=3600).wall_s
        loops_s = _loop_seconds(work, step, scale)
        overhead_s = wall_s - loops_s
        share = overhead_s / wall_s
        is_baby = step.name == "baby GPT"
        rows.append(
            Row(
                "12 gpt overhead",
                f"{step.name}: tracking overhead of `{' '.join(command[:3])}` "
                f"({step.train_params(scale).max_iters} steps): wall - loops = overhead",
                "",
                f"{fmt_seconds(wall_s)} - {fmt_seconds(loops_s)} = {fmt_seconds(overhead_s)}",
                f"{share:.0%}",
                f"<= {MAX_OVERHEAD_SHARE:.0%}" if is_baby else "",
                share <= MAX_OVERHEAD_SHARE if is_baby else None,
            )
        )
    return rows


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _loop_seconds(work: Workload, step: LadderStep, scale: float) -> float:
    """What the train and evaluate stages compute for this step, timed here: the training loop
    with its eval points, then the exact losses."""
    config = step.train_params(scale)
    gpt = step.gpt_config(work.vocab_size)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model: LanguageModel
    if gpt is None:
        bigram = BigramLanguageModel(work.vocab_size)
        model = bigram

        def on_eval(_: int) -> None:
            exact_losses(bigram, work.train_counts, work.val_counts)
    else:
        gpt_model = GPTLanguageModel(gpt)
        model = gpt_model

        def on_eval(_: int) -> None:
            estimated_losses(gpt_model, work.train_tokens, work.val_tokens, config)

    train_minibatch(model, work.train_tokens, config, on_eval, no_progress())
    evaluate.exact_losses(
        model, [work.train_tokens, work.val_tokens], [work.train_counts, work.val_counts]
    )
    return time.perf_counter() - started
