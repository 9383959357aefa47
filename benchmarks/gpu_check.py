"""The GPU check (`make gpu-check`): the CUDA tests and the training rows, on a borrowed GPU.

Sized for a GPU machine lent for minutes, with PyTorch, numpy, pandas, matplotlib, tqdm and
filelock but no MLflow, no DVC and no network: it imports only the model, the training loops
and the lecture's reference, and reads the corpus from the pipeline's data/raw/input.txt (or
--corpus, or a local $BIGRAM_CORPUS_URL), a git-ignored file sent along with the working tree.

1. the CUDA tests (tests/test_cuda.py);
2. steps/s of the lecture's loop, of our eager CUDA step and of our CUDA-graph step, on one GPU;
3. the final exact losses of a default 3000-step run on the GPU against the same run on the CPU;
4. the full GPT (benchmarks/gpt_gpu.py): tokens/s and MFU in float32, bf16 and bf16 compiled,
   then the lecture's 5000-step run, or as many steps as fit in --gpt-seconds, and its val loss;
5. the full GPT in one process per GPU under torchrun's launcher, DDP over NCCL
   (benchmarks/ddp_gpu.py): what the train stage runs with train.processes.

On a machine without CUDA it says so and skips all three. It exits non-zero when a test fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import ddp_gpu, gpt_gpu
from benchmarks.measure import REPO_ROOT, Row, format_table, interleaved_medians, machine_summary
from benchmarks.workload import Workload, find_corpus, load_workload
from pipeline.lm import lecture
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.training import exact_losses, train_minibatch

LECTURE = lecture_train_params()
# CUDA-graph step against the lecture's loop on the same GPU; GPU loss against the CPU's.
SPEEDUP_GOAL = 10.0
LOSS_TOLERANCE = 0.01


def run_cuda_tests() -> bool:
    """tests/test_cuda.py in a child pytest; --noconftest: the suite's fixtures need MLflow."""
    command = [sys.executable, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-q"]
    result = subprocess.run([*command, "tests/test_cuda.py"], cwd=REPO_ROOT)
    return result.returncode == 0


def synchronized(function, device: torch.device):
    def run() -> None:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def new_model(work: Workload, device: torch.device) -> BigramLanguageModel:
    torch.manual_seed(LECTURE.seed)
    return BigramLanguageModel(work.vocab_size).to(device)


def step_rate_rows(work: Workload, steps: int, repeats: int) -> list[Row]:
    """Steps/s of the same AdamW training (batch 32 x 8, no evaluation), three ways, one GPU."""
    cuda = torch.device("cuda")
    tokens = work.train_tokens.to(cuda)
    config = lecture_train_params(max_iters=steps, eval_interval=steps)

    def lecture_loop() -> None:
        model, optimizer = lecture.new_model_and_optimizer(work.vocab_size, cuda)
        lecture.train_steps(model, optimizer, work.reference_train, steps, cuda)

    def ours(cuda_graph: bool):
        def run() -> None:
            model = new_model(work, cuda)
            train_minibatch(
                model, tokens, config, lambda step: None, tqdm(disable=True), cuda_graph=cuda_graph
            )

        return run

    runners = {
        "reference": synchronized(lecture_loop, cuda),
        "eager": synchronized(ours(cuda_graph=False), cuda),
        "graph": synchronized(ours(cuda_graph=True), cuda),
    }
    for warm_up in runners.values():  # CUDA context, kernels' first launch, torch._dynamo import
        warm_up()
    rates = {name: steps / s for name, s in interleaved_medians(runners, repeats).items()}
    reference_rate = rates["reference"]

    def row(measure: str, rate: float, goal: str = "", met: bool | None = None) -> Row:
        return Row(
            "GPU training",
            measure,
            f"{reference_rate:,.0f}",
            f"{rate:,.0f}",
            f"{rate / reference_rate:.1f}x",
            goal,
            met,
        )

    graph_ratio = rates["graph"] / reference_rate
    return [
        row(f"steps/s, eager CUDA step ({steps} steps)", rates["eager"]),
        row(
            f"steps/s, CUDA-graph step ({steps} steps)",
            rates["graph"],
            f">= {SPEEDUP_GOAL:.0f}x",
            graph_ratio >= SPEEDUP_GOAL,
        ),
    ]


def default_run(work: Workload, device: torch.device) -> tuple[float, float, float]:
    """The train stage's default run (3000 steps, exact losses every 300): seconds, losses."""
    tokens = work.train_tokens.to(device)
    train_counts, val_counts = work.train_counts.to(device), work.val_counts.to(device)
    model = new_model(work, device)
    started = time.perf_counter()
    train_minibatch(
        model,
        tokens,
        LECTURE,
        lambda step: exact_losses(model, train_counts, val_counts),
        tqdm(disable=True),
    )
    train_loss, val_loss = exact_losses(model, train_counts, val_counts)
    return time.perf_counter() - started, train_loss, val_loss


def default_run_rows(work: Workload) -> list[Row]:
    default_run(work, torch.device("cuda"))  # Warm-up: graph capture, first kernels.
    gpu_s, gpu_train, gpu_val = default_run(work, torch.device("cuda"))
    cpu_s, cpu_train, cpu_val = default_run(work, torch.device("cpu"))
    gap = max(abs(gpu_train - cpu_train), abs(gpu_val - cpu_val))
    return [
        Row("GPU training", "default run, 3000 steps + 11 exact evals", "", f"{gpu_s:.2f} s"),
        Row("GPU training", "the same run on this machine's CPU", "", f"{cpu_s:.2f} s"),
        Row(
            "GPU training",
            "final exact train / val loss: GPU (CPU)",
            "",
            f"{gpu_train:.4f} / {gpu_val:.4f} ({cpu_train:.4f} / {cpu_val:.4f})",
            "",
            f"within {LOSS_TOLERANCE} of CPU",
            gap <= LOSS_TOLERANCE,
        ),
    ]


def gpt_rows(work: Workload, steps: int, seconds_budget: float) -> list[Row]:
    cuda = torch.device("cuda")
    config, train = gpt_gpu.full_gpt(work.vocab_size)
    rows, fastest = gpt_gpu.throughput_rows(work, config, train, cuda, steps)
    print(format_table(rows), flush=True)
    return rows + gpt_gpu.full_run_rows(work, config, train, cuda, seconds_budget, fastest)


def ddp_rows(work: Workload, steps: int) -> list[Row]:
    """The full GPT on every GPU, one process each; a failure is a row, not the end of the
    report (this part has only run on a CPU so far)."""
    config, train = gpt_gpu.full_gpt(work.vocab_size)
    processes = torch.cuda.device_count()
    try:
        return ddp_gpu.ddp_rows(work, config, train, "cuda", processes, steps)
    except Exception as error:  # reported in the table
        return [Row("GPU DDP", f"{processes} process(es), NCCL", "", f"failed: {error}"[:200])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--corpus", help="Tiny Shakespeare (default: data/raw/input.txt)")
    parser.add_argument("--steps", type=int, default=3000, help="steps per steps/s measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--gpt-steps", type=int, default=100, help="steps per full-GPT tokens/s measurement"
    )
    parser.add_argument(
        "--gpt-seconds", type=float, default=150, help="the full GPT run's time budget"
    )
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)

    summary = f"Machine: {machine_summary(torch.get_num_threads())}"
    print(summary, flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check is skipped (tests, steps/s and losses)")
        return 0
    tests_passed = run_cuda_tests()
    work = load_workload(find_corpus(args.corpus))
    rows = step_rate_rows(work, args.steps, args.repeats) + default_run_rows(work)
    print(format_table(rows), flush=True)  # the bigram's rows survive a GPT part cut short
    rows += gpt_rows(work, args.gpt_steps, args.gpt_seconds)
    rows += ddp_rows(work, args.gpt_steps)
    report = "\n".join(
        [
            summary,
            f"Corpus: {work.corpus}",
            f"CUDA tests (tests/test_cuda.py): {'passed' if tests_passed else 'FAILED'}",
            "",
            format_table(rows),
        ]
    )
    print(report)
    if args.output:
        args.output.write_text(report + "\n", encoding="utf-8")
    missed = [row for row in rows if row.met is False]
    if missed:
        print(f"{len(missed)} goal(s) missed (rows marked NO)", file=sys.stderr)
    return 0 if tests_passed else 1


if __name__ == "__main__":
    sys.exit(main())
