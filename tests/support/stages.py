"""Stages run the way a user runs them: a training long enough to interrupt, `dvc exp run`;
and the stages file they are declared in."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

from testbed import REPO_ROOT, run

# A training that runs until the test stops it.
ENDLESS_TRAINING = {"max_iters": 10**7, "eval_interval": 10**6}


def start_and_wait_for_training(
    cmd: list[str], repo: Path, env: dict, step: int = 0
) -> subprocess.Popen:
    """Start cmd in its own process group; return once training has logged its eval point
    ``step`` (step 0: it has started)."""
    process = subprocess.Popen(
        cmd,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if line.startswith(f"step {step}:"):
            return process
    process.wait(timeout=60)
    raise AssertionError(f"training never reached step {step}:\n{process.stderr.read()}")


def exp_run(repo: Path, env: dict, override: str) -> tuple[str, str]:
    """`dvc exp run -S override`: (the experiment's name, its stdout)."""
    result = run(["dvc", "exp", "run", "-S", override], repo, env)
    return experiment_name(result.stdout), result.stdout


def experiment_name(stdout: str) -> str:
    """The experiment that `dvc exp run` says it ran."""
    return re.search(r"Ran experiment\(s\): (\S+)", stdout).group(1)


def dvc_yaml(repo: Path = REPO_ROOT) -> dict:
    """dvc.yaml of repo (by default, of this checkout) as a dict."""
    return YAML(typ="safe", pure=True).load(repo / "dvc.yaml")
