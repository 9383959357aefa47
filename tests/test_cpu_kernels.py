"""The same outputs whatever CPU kernels a machine offers (pipeline.determinism).

PyTorch runs a machine's widest kernels (AVX-512 on a CPU that has it, AVX2 on this one) unless
ATEN_CPU_CAPABILITY says otherwise, and the vector width changes the order of float sums. A
machine with AVX-512 is emulated here by the shell asking for the widest level this machine
has, a machine without it by the shell asking for the plain one: the train and evaluate stages
must give the same bytes under both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from pipeline.determinism import PINNED_ENVIRONMENT
from testbed import run_stage

pytestmark = pytest.mark.e2e

TRACKED_OUTPUTS = (
    "data/train/model.pt",
    "data/train/loss_curve.csv",
    "data/evaluate/metrics.json",
    "data/evaluate/next_char_probs.png",
)


def widest_kernel_level() -> str:
    """What torch picks on this machine when nothing pins it (AVX2 here, AVX512 on others)."""
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENVIRONMENT}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip().lower()


def test_train_and_evaluate_give_the_same_bytes_under_every_kernel_level(prepared_copy):
    repo, env = prepared_copy
    widest = widest_kernel_level()
    if widest == "default":
        pytest.fail("this machine offers one CPU kernel level only: nothing to compare")
    outputs, capabilities = {}, {}
    # Under the widest level and the plain one: the pin (AVX2 here) must override both.
    for level in (widest, "default"):
        # MKL (torch's BLAS) too: its own choice of code path, or its most portable one.
        level_env = {k: v for k, v in env.items() if k != "MKL_CBWR"}
        level_env["ATEN_CPU_CAPABILITY"] = level
        if level == "default":
            level_env["MKL_CBWR"] = "COMPATIBLE"
        for stage in ("train", "evaluate"):
            result = run_stage(stage, repo, level_env)
            assert result.returncode == 0, result.stderr[-3000:]
        outputs[level] = {path: (repo / path).read_bytes() for path in TRACKED_OUTPUTS}
        client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
        (training,) = client.search_runs(
            [client.get_experiment_by_name("bigram").experiment_id],
            "tags.stage = 'train'",
            order_by=["start_time DESC"],
            max_results=1,
        )
        capabilities[level] = (training.data.tags["cpu.capability"], training.data.tags["cpu.pins"])

    assert outputs[widest] == outputs["default"]
    # The run says which kernels computed it, and which pins made them so.
    pins = " ".join(f"{name}={value}" for name, value in PINNED_ENVIRONMENT.items())
    pinned = PINNED_ENVIRONMENT["ATEN_CPU_CAPABILITY"].upper()
    assert capabilities == {widest: (pinned, pins), "default": (pinned, pins)}
