"""Timing, child-process and table helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the results table; ``met`` is None where the figure has no goal."""

    target: str
    measure: str
    reference: str
    ours: str
    ratio: str = ""
    goal: str = ""
    met: bool | None = None


def seconds_of(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved_medians(
    functions: dict[str, Callable[[], object]], repeats: int
) -> dict[str, float]:
    """Median seconds of each function, run in turns (a, b, a, b, ...) so that a slow spell of a
    shared machine hits every one of them alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(seconds_of(function))
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


# Runs a command as its child and writes the child's peak RSS (kB) to a file. A child forked
# from this (large) process would count this process's pages, shared until exec, in its peak;
# forked from this small launcher it counts the launcher's few MB at most.
PEAK_RSS_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 900
) -> ChildRun:
    """Run a command to completion: its wall time and its own peak resident memory."""
    with (
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
        tempfile.NamedTemporaryFile("r") as peak_file,
    ):
        launcher = [sys.executable, "-I", "-S", "-c", PEAK_RSS_LAUNCHER, peak_file.name]
        started = time.perf_counter()
        child = subprocess.run(
            [*launcher, *command], cwd=cwd, env=env, stdout=stdout, stderr=stderr, timeout=timeout_s
        )
        wall_s = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        peak_kb = peak_file.read().strip()
        result = ChildRun(
            returncode=child.returncode,
            wall_s=wall_s,
            peak_rss_bytes=int(peak_kb or 0) * 1024,  # Linux reports kilobytes.
            stdout=stdout.read().decode(errors="replace"),
            stderr=stderr.read().decode(errors="replace"),
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode} in {cwd}:\n{result.stderr[-3000:]}"
        )
    return result


# A line of `python -X importtime` output: self and cumulative microseconds, then the module
# name indented by two spaces per nesting level.
IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def import_seconds(importtime_stderr: str) -> tuple[float, set[str]]:
    """Total import time (the outermost imports' cumulative times) and every module imported."""
    total_us = 0
    modules = set()
    for line in importtime_stderr.splitlines():
        match = IMPORTTIME_LINE.match(line)
        if match:
            modules.add(match.group(4))
            if len(match.group(3)) == 1:  # One space: imported by the program, not a module.
                total_us += int(match.group(2))
    return total_us / 1e6, modules


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_summary(threads: int) -> str:
    import torch

    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (
        f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} cores, "
        f"{memory_gb:.0f} GiB, {cuda}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {threads} torch thread(s)"
    )


def format_table(rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal and pasteable into the README."""
    header = ["target", "measure", "reference", "ours", "ratio", "goal", "met"]
    cells = [
        [r.target, r.measure, r.reference, r.ours, r.ratio, r.goal, _met_mark(r.met)] for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in cells)])


def _met_mark(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def fmt_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(size: float) -> str:
    return f"{size / 1e6:.0f} MB"
