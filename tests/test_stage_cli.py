"""Stages take no command-line arguments: --help says what a stage does, a flag is refused.

Before, `python -m pipeline.train --help` trained and registered a model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "vocab", "train", "evaluate", "sample", "link")


def run_stage(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("stage", STAGES)
def test_help_describes_the_stage_and_runs_nothing(stage: str, tmp_path: Path):
    result = run_stage(stage, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m pipeline.{stage} [-h]")
    assert f", {stage}: " in result.stdout  # The module docstring: "Stage N, <stage>: ..."
    assert not any(tmp_path.iterdir()), "the stage wrote files"


def test_an_unknown_flag_is_a_usage_error_not_a_run(tmp_path: Path):
    result = run_stage("train", "--lr", "3e-3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "usage: python -m pipeline.train [-h]",
        "python -m pipeline.train: error: unrecognized arguments: --lr 3e-3",
    ]
    assert not any(tmp_path.iterdir()), "the stage wrote files"
