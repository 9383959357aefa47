"""Target: what the CPU kernel pin costs (pipeline.determinism).

Every stage runs torch's AVX2 kernels where the CPU has AVX2, so that a machine with AVX-512 and
one without compute the same bytes. This target measures the training step rate of the train
stage's loop at three kernel levels: ``pinned`` (as the stages run), ``widest`` (what torch
picks unpinned: AVX512 on a CPU that has it) and ``portable`` (DEFAULT kernels and MKL's
COMPATIBLE branch, which every CPU runs: the pin not chosen), at V = 65 (Tiny Shakespeare) and
V = 4096 (seeded random tokens, the largest vocabulary data.max_vocab_size allows by default).

torch picks its kernel level once per process, so each measurement is a child process:

    python -m benchmarks.kernels pinned|widest|portable VOCAB_SIZE STEPS CORPUS

prints the kernel level it ran and its steps per second as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.measure import REPO_ROOT, Row

LEVELS = ("pinned", "widest", "portable")
# Steps per measurement: a few seconds each (a V = 4096 step updates a 16.8M-entry table).
STEPS = {65: 10_000, 4096: 40}
LARGE_VOCAB_TOKENS = 1_000_000


def measure_in_this_process(level: str, vocab_size: int, steps: int, corpus: Path) -> dict:
    if level != "pinned":
        # Fix torch's kernel level and MKL's branch before pipeline/__init__.py pins them: each
        # reads its variable once, torch at its first kernel dispatch, MKL at its first call.
        import os

        if level == "portable":
            os.environ.update(ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
        import torch

        torch.backends.cpu.get_cpu_capability()
        torch.ones(64, 64) @ torch.ones(64, 64)  # MKL's first call: a matrix product
    import dataclasses
    import time

    import numpy as np
    import torch

    from benchmarks.compute import LECTURE, no_progress
    from benchmarks.workload import load_workload
    from pipeline.lm.bigram import BigramLanguageModel
    from pipeline.lm.tokens import to_device_tokens
    from pipeline.lm.training import train_minibatch

    torch.set_num_threads(1)
    if vocab_size == 65:
        tokens = load_workload(corpus).train_tokens
    else:
        generator = np.random.default_rng(LECTURE.seed)
        tokens = to_device_tokens(
            generator.integers(0, vocab_size, LARGE_VOCAB_TOKENS, dtype=np.int32), "cpu"
        )
    config = dataclasses.replace(LECTURE, max_iters=steps, eval_interval=steps)
    torch.manual_seed(LECTURE.seed)
    model = BigramLanguageModel(vocab_size)
    # One warm-up run pays the one-off costs (AdamW imports torch._dynamo).
    train_minibatch(BigramLanguageModel(vocab_size), tokens, config, lambda _: None, no_progress())
    started = time.perf_counter()
    train_minibatch(model, tokens, config, lambda _: None, no_progress())
    seconds = time.perf_counter() - started
    return {"capability": torch.backends.cpu.get_cpu_capability(), "steps_per_s": steps / seconds}


def measure_in_child(level: str, vocab_size: int, corpus: Path, env: dict[str, str]) -> dict:
    import subprocess

    command = [sys.executable, "-m", "benchmarks.kernels", level, str(vocab_size)]
    command += [str(STEPS[vocab_size]), str(corpus)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def kernel_rows(corpus: Path, repeats: int) -> list[Row]:
    """Pinned against widest, in turns, for each vocabulary size: median steps per second."""
    import os

    from pipeline.determinism import PINNED_ENVIRONMENT

    # The children start from an unpinned environment: this process has pinned its own.
    env = {name: value for name, value in os.environ.items() if name not in PINNED_ENVIRONMENT}
    rows = []
    for vocab_size in STEPS:
        rates: dict[str, list[float]] = {level: [] for level in LEVELS}
        capability = {}
        for _ in range(repeats):
            for level in LEVELS:
                measured = measure_in_child(level, vocab_size, corpus, env)
                rates[level].append(measured["steps_per_s"])
                capability[level] = measured["capability"]
        pinned, widest, portable = (statistics.median(rates[level]) for level in LEVELS)
        rows.append(
            Row(
                "kernel pin",
                f"steps/s at V = {vocab_size}: pinned {capability['pinned']} against unpinned "
                f"{capability['widest']}",
                f"{widest:,.1f}",
                f"{pinned:,.1f}",
                f"{pinned / widest:.2f}x",
                "",
                None,
            )
        )
        rows.append(
            Row(
                "kernel pin",
                f"steps/s at V = {vocab_size}: pinned {capability['pinned']} against "
                f"{capability['portable']} everywhere",
                f"{portable:,.1f}",
                f"{pinned:,.1f}",
                f"{pinned / portable:.2f}x",
                "",
                None,
            )
        )
    return rows


if __name__ == "__main__":
    level_arg, vocab_arg, steps_arg, corpus_arg = sys.argv[1:5]
    measured = measure_in_this_process(level_arg, int(vocab_arg), int(steps_arg), Path(corpus_arg))
    print(json.dumps(measured))
