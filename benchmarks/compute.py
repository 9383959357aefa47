"""Targets 1-4, measured in this process against the reference run beside them.

1. training steps per second; 2. exact evaluation against estimate_loss; 3. generation;
4. method: counts reaching the bigram optimum.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from tqdm import tqdm

from benchmarks.measure import Row, fmt_seconds, interleaved_medians, seconds_of
from benchmarks.workload import Workload
from pipeline.lm import lecture
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.counts import bigram_counts, bigram_loss_from_counts
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.training import exact_losses, train_minibatch, train_on_counts

LECTURE = lecture_train_params()
GENERATED_CHARS = 10_000
GENERATION_BATCH = 64
OPTIMUM_TOLERANCE = 1e-3


def no_progress() -> tqdm:
    return tqdm(disable=True)


def new_model(work: Workload, device: torch.device | str = "cpu") -> BigramLanguageModel:
    torch.manual_seed(LECTURE.seed)
    return BigramLanguageModel(work.vocab_size).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_rows(work: Workload, steps: int, repeats: int, device: torch.device) -> list[Row]:
    """Target 1: steps per second of the same loop (AdamW, batch 32 x 8), no evaluation."""
    reference_train = work.reference_train
    tokens = work.train_tokens.to(device)
    config = dataclasses.replace(LECTURE, max_iters=steps, eval_interval=steps)

    def run_reference() -> None:
        model, optimizer = lecture.new_model_and_optimizer(work.vocab_size, device)
        lecture.train_steps(model, optimizer, reference_train, steps, device)
        synchronize(device)

    def run_ours() -> None:
        train_minibatch(new_model(work, device), tokens, config, lambda step: None, no_progress())
        synchronize(device)

    # First runs pay one-off costs (AdamW imports torch._dynamo, CUDA graph capture).
    run_reference()
    run_ours()
    medians = interleaved_medians({"reference": run_reference, "ours": run_ours}, repeats)
    reference_rate = steps / medians["reference"]
    ours_rate = steps / medians["ours"]
    ratio = ours_rate / reference_rate
    return [
        Row(
            "1 training",
            f"steps/s, {steps} AdamW steps of batch 32 x 8 ({device.type})",
            f"{reference_rate:,.0f}",
            f"{ours_rate:,.0f}",
            f"{ratio:.1f}x",
            ">= 3x",
            ratio >= 3,
        )
    ]


def default_run_rows(work: Workload, repeats: int) -> list[Row]:
    """The whole default training (3000 steps and its evaluations), as each side does it."""
    splits = {"train": work.reference_train, "val": work.reference_val}
    final: dict[str, float] = {}

    def run_reference() -> None:
        model, optimizer = lecture.new_model_and_optimizer(work.vocab_size)
        for _ in range(0, LECTURE.max_iters, LECTURE.eval_interval):
            lecture.estimate_loss(model, splits)
            lecture.train_steps(model, optimizer, work.reference_train, LECTURE.eval_interval)
        weights = model.table.weight.detach()
        final["reference"] = bigram_loss_from_counts(weights, work.train_counts).item()

    def run_ours() -> None:
        model = new_model(work)

        def on_eval(step: int) -> None:
            exact_losses(model, work.train_counts, work.val_counts)

        train_minibatch(model, work.train_tokens, LECTURE, on_eval, no_progress())
        final["ours"] = exact_losses(model, work.train_counts, work.val_counts)[0]

    medians = interleaved_medians({"reference": run_reference, "ours": run_ours}, repeats)
    ratio = medians["reference"] / medians["ours"]
    return [
        Row(
            "1 training",
            "default run: 3000 steps + evals every 300 (s)",
            fmt_seconds(medians["reference"]),
            fmt_seconds(medians["ours"]),
            f"{ratio:.1f}x",
            "",
            None,
        ),
        Row(
            "1 training",
            "default run: final exact train loss (same math)",
            f"{final['reference']:.4f}",
            f"{final['ours']:.4f}",
            "",
            f">= {work.optimum:.4f}",
            final["ours"] >= work.optimum,
        ),
    ]


def evaluation_rows(work: Workload, repeats: int) -> list[Row]:
    """Target 2: exact loss from bigram counts against the lecture's 200-batch estimate."""
    model = new_model(work)
    train_on_counts(model, work.train_counts, LECTURE, lambda step: None, no_progress())
    reference_model = lecture.ReferenceBigram(work.vocab_size)
    with torch.no_grad():
        reference_model.table.weight.copy_(model.token_embedding_table.weight)
    splits = {"train": work.reference_train, "val": work.reference_val}
    estimates: list[float] = []
    evaluations = 100

    def run_reference() -> None:
        estimates.append(lecture.estimate_loss(reference_model, splits)["val"])

    def run_ours() -> None:
        for _ in range(evaluations):
            exact_losses(model, work.train_counts, work.val_counts)

    def count_bigrams() -> None:
        bigram_counts(work.train_tokens, work.vocab_size)
        bigram_counts(work.val_tokens, work.vocab_size)

    medians = interleaved_medians(
        {"reference": run_reference, "ours": run_ours, "count": count_bigrams}, repeats
    )
    per_eval = medians["ours"] / evaluations
    ratio = medians["reference"] / per_eval
    exact_val = exact_losses(model, work.train_counts, work.val_counts)[1]
    ten_reference = 10 * medians["reference"]
    ten_ours = medians["count"] + 10 * per_eval
    spread = statistics.stdev(estimates) if len(estimates) > 1 else float("nan")
    return [
        Row(
            "2 evaluation",
            "one evaluation of both splits",
            fmt_seconds(medians["reference"]),
            fmt_seconds(per_eval),
            f"{ratio:,.0f}x",
            ">= 10x",
            ratio >= 10,
        ),
        Row(
            "2 evaluation",
            "counting both splits' bigrams, once per run (O(N))",
            "",
            fmt_seconds(medians["count"]),
            "",
            "",
            None,
        ),
        Row(
            "2 evaluation",
            "10 evaluations, counting included",
            fmt_seconds(ten_reference),
            fmt_seconds(ten_ours),
            f"{ten_reference / ten_ours:.0f}x",
            ">= 10x",
            ten_reference / ten_ours >= 10,
        ),
        Row(
            "2 evaluation",
            "val loss of a fitted model: mean (std) of estimates vs exact",
            f"{statistics.mean(estimates):.4f} ({spread:.4f})",
            f"{exact_val:.4f} (0)",
            "",
            "exact",
            True,
        ),
    ]


def generation_rows(work: Workload, repeats: int) -> list[Row]:
    """Target 3: O(n) sampling from precomputed probabilities against the O(n^2) loop."""
    model = new_model(work)
    reference_model = lecture.ReferenceBigram(work.vocab_size)
    with torch.no_grad():
        reference_model.table.weight.copy_(model.token_embedding_table.weight)
    start = torch.zeros((1, 1), dtype=torch.long)
    batch_start = torch.zeros((GENERATION_BATCH, 1), dtype=torch.long)
    generator = torch.Generator().manual_seed(LECTURE.seed)

    medians = interleaved_medians(
        {
            "reference": lambda: reference_model.generate(start, GENERATED_CHARS),
            "ours": lambda: model.generate(start, GENERATED_CHARS, generator=generator),
        },
        repeats,
    )
    batch_s = statistics.median(
        seconds_of(lambda: model.generate(batch_start, GENERATED_CHARS, generator=generator))
        for _ in range(repeats)
    )
    ratio = medians["reference"] / medians["ours"]
    batch_chars = GENERATION_BATCH * GENERATED_CHARS
    return [
        Row(
            "3 generation",
            f"{GENERATED_CHARS:,} characters, one sample",
            fmt_seconds(medians["reference"]),
            fmt_seconds(medians["ours"]),
            f"{ratio:,.0f}x",
            ">= 50x",
            ratio >= 50,
        ),
        Row(
            "3 generation",
            f"batch of {GENERATION_BATCH} samples x {GENERATED_CHARS:,} characters",
            "",
            f"{fmt_seconds(batch_s)} ({batch_chars / batch_s / 1e6:.1f} M chars/s)",
            "",
            "supported",
            True,
        ),
    ]


def optimum_rows(work: Workload, repeats: int) -> list[Row]:
    """Target 4: method counts (L-BFGS on the count matrix) against the bigram optimum."""
    counts_config = dataclasses.replace(LECTURE, method="counts")

    def default_fit() -> float:
        model = new_model(work)
        train_on_counts(model, work.train_counts, counts_config, lambda step: None, no_progress())
        return exact_losses(model, work.train_counts, work.val_counts)[0] - work.optimum

    def time_to_tolerance() -> float:
        """Seconds until the exact train loss is within tolerance, checked every 5 iterations."""
        model = new_model(work)
        started = time.perf_counter()
        reached: list[float] = []

        def on_eval(step: int) -> None:
            gap = exact_losses(model, work.train_counts, work.val_counts)[0] - work.optimum
            if not reached and gap < OPTIMUM_TOLERANCE:
                reached.append(time.perf_counter() - started)

        fine_config = dataclasses.replace(counts_config, eval_interval=5)
        train_on_counts(model, work.train_counts, fine_config, on_eval, no_progress())
        return reached[0] if reached else float("inf")

    fit_times, gaps, reach_times = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        gaps.append(default_fit())
        fit_times.append(time.perf_counter() - started)
        reach_times.append(time_to_tolerance())
    reach_s = statistics.median(reach_times)

    reference_model, optimizer = lecture.new_model_and_optimizer(work.vocab_size)
    lecture.train_steps(reference_model, optimizer, work.reference_train, LECTURE.max_iters)
    reference_gap = (
        bigram_loss_from_counts(reference_model.table.weight.detach(), work.train_counts).item()
        - work.optimum
    )
    return [
        Row(
            "4 optimum",
            f"time to train loss within {OPTIMUM_TOLERANCE:g} of the optimum {work.optimum:.4f}",
            f"not reached (gap {reference_gap:.4f} after 3000 steps)",
            fmt_seconds(reach_s),
            "",
            "< 1 s",
            reach_s < 1,
        ),
        Row(
            "4 optimum",
            "method: counts at default params (max_iters 3000): time, final gap",
            "",
            f"{fmt_seconds(statistics.median(fit_times))}, gap {statistics.median(gaps):.1e}",
            "",
            f"gap < {OPTIMUM_TOLERANCE:g}",
            statistics.median(gaps) < OPTIMUM_TOLERANCE,
        ),
    ]
