"""What CPU results depend on beyond params, code and data, pinned before torch loads.

PyTorch picks its CPU kernels by the instruction set it finds: ATen dispatches each operator to a
build for DEFAULT, AVX2 or AVX512 (``torch.backends.cpu.get_cpu_capability()``), and MKL, its
BLAS on x86-64, does the same. A wider vector adds a float sum's terms in another order, so the
same params and seed give weights that differ in the last bits on a CPU with AVX-512 and one
without. Pinning the kernel level, and the thread count that splits parallel sums, makes the
train and evaluate stages byte-identical on every x86-64 CPU with AVX2 and the same torch build.

The level pinned is AVX2 wherever the CPU has it (every x86-64 CPU with AVX-512 has it too, as
has nearly every x86-64 CPU since 2015), and the portable DEFAULT kernels elsewhere, whose
results differ from AVX2's. DEFAULT everywhere would reproduce on older CPUs too, but AVX2
trains 1.1x as fast at V = 65 and 2.3x at V = 4096 (`make bench`, target ``kernels``).
Whether the CPU has AVX2 is read from /proc/cpuinfo, before torch loads; where there is none
(macOS, Windows), DEFAULT is pinned.

Both libraries read these variables once, when torch first dispatches a kernel: pin_environment
runs in pipeline/__init__.py, before any stage imports torch. The pins override the caller's
environment, so that a shell's ``ATEN_CPU_CAPABILITY`` cannot change a tracked output. The
train stage records them, and the kernel level torch reports, among the run's rebuild tags
(pipeline.tracking.rebuild).
"""

from __future__ import annotations

import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_has_avx2(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has AVX2 and FMA, the pair torch's AVX2 kernels need."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def pinned_environment(avx2: bool) -> dict[str, str]:
    return {
        # torch trusts this variable: "avx2" on a CPU without it would die of an illegal
        # instruction, hence the check.
        "ATEN_CPU_CAPABILITY": "avx2" if avx2 else "default",
        # MKL's conditional numerical reproducibility mode on the same instruction set (the
        # bigram does no matrix products; the pin keeps those a model adds reproducible).
        "MKL_CBWR": "AVX2" if avx2 else "COMPATIBLE",
        # One thread in each of torch's pools: how a parallel sum is split depends on the count.
        # The train stage then sets train.threads (pin_threads), a param for the same reason.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


PINNED_ENVIRONMENT = pinned_environment(cpu_has_avx2())


def pin_environment() -> None:
    """Set the pins in this process's environment (so also in its children's)."""
    os.environ.update(PINNED_ENVIRONMENT)


def pins_description() -> str:
    """The pins as one line, ``NAME=value`` each, for the run's rebuild record."""
    return " ".join(f"{name}={value}" for name, value in PINNED_ENVIRONMENT.items())


def pin_threads(threads: int = 1) -> None:
    """A fixed number of torch threads for a stage that computes with torch: the order of a
    parallel float sum depends on the thread count, so the same count gives the same bytes.
    One by default (bigram tensors are too small to gain from threads); training takes
    train.threads, which a GPT's matmuls gain from. torch is imported here, by a stage that has
    loaded it, never before the pins."""
    import torch

    torch.set_num_threads(threads)
