"""Run the benchmarks and print one table: the reference and ours, measured in the same run.

    python -m benchmarks.run                       # every target
    python -m benchmarks.run --quick               # fewer repeats, a 20 MB corpus, 2 queued exps
    python -m benchmarks.run --only training,generation
    python -m benchmarks.run --output bench.md     # also write the table to a file

Torch runs on one thread by default (--threads), in this process and in every stage and
reference process: on a shared machine, idle-waiting OpenMP threads make tiny ops erratic.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TARGETS = (
    "training",
    "evaluation",
    "generation",
    "optimum",
    "corpus",
    "overhead",
    "scale",
    "stage-cost",
    "turnaround",
    "kernels",
    "gpt-training",
    "gpt-overhead",
    "checkpoints",
    "s3",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--only",
        default=",".join(TARGETS),
        help=f"comma-separated targets, by name or number 1-{len(TARGETS)}: {', '.join(TARGETS)}",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller corpus")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--corpus", help="Tiny Shakespeare (default: data/raw/input.txt)")
    parser.add_argument(
        "--corpus-mb", type=int, help="size of the large corpus (default 200, quick 20)"
    )
    parser.add_argument("--output", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    args.targets = [_target_name(name.strip(), parser) for name in args.only.split(",")]
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.corpus_mb = args.corpus_mb or (20 if args.quick else 200)
    return args


def _target_name(name: str, parser: argparse.ArgumentParser) -> str:
    if name.isdigit() and 1 <= int(name) <= len(TARGETS):
        return TARGETS[int(name) - 1]
    if name not in TARGETS:
        parser.error(
            f"unknown target {name!r}; choose from {', '.join(TARGETS)} or 1-{len(TARGETS)}"
        )
    return name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before torch is imported, so that its thread pool starts at this size.
    import os

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from benchmarks import checkpoints, compute, gpt, kernels, s3, stages, turnaround
    from benchmarks.measure import format_table, machine_summary
    from benchmarks.workload import find_corpus, load_workload

    torch.set_num_threads(args.threads)
    corpus = find_corpus(args.corpus)
    work = load_workload(corpus)
    steps = 300 if args.quick else 1000
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runners = {
        "training": lambda: (
            compute.training_rows(work, steps, args.repeats, torch.device("cpu"))
            + (
                compute.training_rows(work, steps, args.repeats, device)
                if device.type == "cuda"
                else []
            )
            + compute.default_run_rows(work, max(1, args.repeats // 2))
        ),
        "evaluation": lambda: compute.evaluation_rows(work, args.repeats),
        "generation": lambda: compute.generation_rows(work, args.repeats),
        "optimum": lambda: compute.optimum_rows(work, args.repeats),
        "corpus": lambda: stages.corpus_rows(corpus, args.corpus_mb, scratch, args.threads),
        "overhead": lambda: stages.overhead_rows(
            corpus, scratch, args.threads, max(1, args.repeats // 2)
        ),
        "scale": lambda: turnaround.scale_rows(
            corpus, scratch, args.threads, max(1, args.repeats // 2)
        ),
        "stage-cost": lambda: turnaround.stage_cost_rows(
            corpus, scratch, args.threads, max(2, args.repeats // 2)
        ),
        # Quick: 2 queued experiments per batch (enough for `-j 2`) instead of 8.
        "turnaround": lambda: turnaround.turnaround_rows(
            corpus, scratch, args.threads, 2 if args.quick else turnaround.QUEUED_EXPERIMENTS
        ),
        "kernels": lambda: kernels.kernel_rows(corpus, max(1, args.repeats // 2)),
        "gpt-training": lambda: gpt.training_rows(work, args.quick, max(1, args.repeats // 2)),
        "gpt-overhead": lambda: gpt.overhead_rows(work, corpus, scratch, args.threads, args.quick),
        "checkpoints": lambda: checkpoints.checkpoint_rows(work, scratch, args.repeats),
        "s3": lambda: s3.s3_rows(scratch, args.repeats),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bigram-bench-") as scratch_name:
        scratch = Path(scratch_name)
        for target in args.targets:
            print(f"running {target} ...", file=sys.stderr, flush=True)
            rows.extend(runners[target]())
    report = f"Machine: {machine_summary(args.threads)}\nCorpus: {corpus}\n\n{format_table(rows)}"
    print(report)
    if args.output:
        args.output.write_text(report + "\n", encoding="utf-8")
    missed = [row for row in rows if row.met is False]
    if missed:
        print(f"\n{len(missed)} goal(s) missed (rows marked NO)", file=sys.stderr)


if __name__ == "__main__":
    main()
