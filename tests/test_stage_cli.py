"""How a stage runs: no command-line arguments (--help says what a stage does, a flag is
refused), and it ends with the pipeline that runs it, and with one line on any stop signal.

Before, `python -m pipeline.stages.train --help` trained and registered a model, and a stage whose
`dvc` was killed trained on as an orphan.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import files_in, update_params
from tests.support.stages import ENDLESS_TRAINING, start_and_wait_for_training
from tests.support.store import train_runs

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check", "download", "vocab", "train", "evaluate", "register", "sample", "link")


def run_stage(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.stages.{stage}", *args],
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
    assert result.stdout.startswith(f"usage: python -m pipeline.stages.{stage} [-h]")
    assert f", {stage}: " in result.stdout  # The module docstring: "Stage N, <stage>: ..."
    assert not any(tmp_path.iterdir()), "the stage wrote files"


def test_an_unknown_flag_is_a_usage_error_not_a_run(tmp_path: Path):
    result = run_stage("train", "--lr", "3e-3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "usage: python -m pipeline.stages.train [-h]",
        "python -m pipeline.stages.train: error: unrecognized arguments: --lr 3e-3",
    ]
    assert not any(tmp_path.iterdir()), "the stage wrote files"


# A stage ends with the pipeline that runs it ---------------------------------------------


def stage_processes(repo: Path, stage: str) -> list[int]:
    """The ids of the processes running `python -m pipeline.stages.<stage>` in repo."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue  # Gone meanwhile, or not ours to read.
        if f"pipeline.stages.{stage}".encode() in argv and cwd == repo.resolve():
            found.append(int(proc.name))
    return found


def kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.2)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
# DVC runs a command as `$SHELL -c <cmd>`: bash replaces itself by the command, dash
# (Debian's /bin/sh, DVC's choice when SHELL is unset) stays between DVC and the stage.
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_ends_with_the_dvc_process_that_runs_it(prepared_copy, shell):
    repo, env = prepared_copy
    update_params(repo, train=ENDLESS_TRAINING)
    env["SHELL"] = shell
    repro = start_and_wait_for_training(["dvc", "repro"], repo, env)
    [training] = stage_processes(repo, "train")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(kill_if_alive, training)
        cleanup.callback(repro.kill)
        repro.send_signal(signal.SIGTERM)  # DVC alone, not its process group.
        repro.wait(timeout=30)
        # Before, the stage went on training as an orphan, to write model.pt and run.json later.
        assert wait_until_gone(training, timeout_s=30), "the train stage outlived dvc"

    assert files_in(repo / "data/train") == [], "no model, no curve, no run.json"
    [killed] = train_runs(repo)
    assert killed.info.status == "KILLED"


# A stop signal is one line at every moment of a stage's life -----------------------------


def wait_until_loading(process: subprocess.Popen, library: str) -> None:
    """Return once the process has mapped the library: it is inside the stage's imports."""
    deadline = time.monotonic() + 60
    maps = Path(f"/proc/{process.pid}/maps")
    while library not in maps.read_text():
        assert process.poll() is None and time.monotonic() < deadline, "never loaded " + library
        time.sleep(0.005)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_a_stage_loads_its_modules_is_one_line(tmp_path, signum):
    """Before: Ctrl-C printed the import's KeyboardInterrupt traceback, SIGTERM ended it -15
    without a word. The train stage imports MLflow, then torch, before its own modules."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.train"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(kill_if_alive, stage.pid)
        wait_until_loading(stage, "libtorch")
        stage.send_signal(signum)
        _, stderr = stage.communicate(timeout=60)

    assert stage.returncode == 130, stderr
    [line] = stderr.splitlines()
    assert line.startswith("error: stopped by "), line
    assert not any(tmp_path.iterdir()), "the stage wrote files"


# A stage whose interpreter takes its time to shut down, as torch's and MLflow's objects do.
SLOW_SHUTDOWN_STAGE = """
import time
from pipeline.cli import stage_entry_point

class FreedLast:
    def __del__(self):
        time.sleep(5)

freed_last = FreedLast()
stage_entry_point(lambda: print("done", flush=True))()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_a_stage_finished_keeps_its_success(tmp_path, signum):
    """Python puts the default handlers back before it frees the last objects: a signal then
    ended a finished stage -15 (or -2) with no message. Its outputs are complete: exit 0."""
    stage = subprocess.Popen(
        [sys.executable, "-c", SLOW_SHUTDOWN_STAGE],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(kill_if_alive, stage.pid)
        assert stage.stdout.readline() == "done\n"
        time.sleep(0.5)  # Into the shutdown, where the last objects are freed.
        stage.send_signal(signum)
        _, stderr = stage.communicate(timeout=60)

    assert stage.returncode == 0 and stderr == ""
