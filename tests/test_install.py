"""`make install` picks PyTorch's build (issue 17): PyPI's torch for Linux is the CUDA build, so a
Linux machine without a working `nvidia-smi` takes the CPU wheel from PyTorch's own index, and
an explicit TORCH_REQUIREMENT (CI's, served from its local wheel folder) adds no index to reach.

Nothing is installed: the real Makefile runs as `make -n install` (print, don't run) in a copy
with no .venv, and PATH holds only a fake `uname` and, per case, a fake `nvidia-smi`, so the
host's own GPU and OS don't matter. The environment is otherwise empty: under `make test` the
outer make's command-line variables (CI's TORCH_REQUIREMENT) would reach this make too.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from testbed import run

REPO = Path(__file__).resolve().parent.parent
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
NVIDIA_SMI_WORKS = "#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n"
# What nvidia-smi does on a machine with the tool but no driver or GPU.
NVIDIA_SMI_FAILS = "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n"
MAKE = shutil.which("make")
# The torch line as it was before the guess, less the requirement.
PIP_INSTALL_WITH_LOCK = [".venv/bin/pip", "install", "--quiet", "--constraint", "requirements.lock"]

pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make, which the README requires")


def write_tool(directory: Path, name: str, script: str) -> None:
    tool = directory / name
    tool.write_text(script)
    tool.chmod(0o755)


def torch_install_command(
    tmp_path: Path, *, system: str, nvidia_smi: str | None, make_args: tuple[str, ...] = ()
) -> list[str]:
    """The pip command `make install` would run to install torch, as arguments."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(REPO / name, repo / name)
    tools = tmp_path / "bin"
    tools.mkdir()
    write_tool(tools, "uname", f"#!/bin/sh\necho {system}\n")
    if nvidia_smi is not None:
        write_tool(tools, "nvidia-smi", nvidia_smi)
    dry_run = run([MAKE, "-n", "install", *make_args], repo, env={"PATH": str(tools)}, timeout=60)
    commands = [shlex.split(line) for line in dry_run.stdout.splitlines()]
    [torch_command] = [c for c in commands if any(arg.startswith("torch") for arg in c)]
    return torch_command


def index_url(command: list[str]) -> str | None:
    return command[command.index("--index-url") + 1] if "--index-url" in command else None


@pytest.mark.parametrize("nvidia_smi", [NVIDIA_SMI_FAILS, None], ids=["fails", "absent"])
def test_linux_without_a_gpu_takes_the_cpu_wheel_from_pytorchs_index(tmp_path, nvidia_smi):
    command = torch_install_command(tmp_path, system="Linux", nvidia_smi=nvidia_smi)
    assert index_url(command) == CPU_INDEX_URL
    # torch alone: its dependencies come with the project's, from PyPI at the lock's versions.
    assert "--no-deps" in command
    assert command[-1] == "torch"


def test_linux_with_a_gpu_takes_pypis_torch(tmp_path):
    command = torch_install_command(tmp_path, system="Linux", nvidia_smi=NVIDIA_SMI_WORKS)
    assert command == PIP_INSTALL_WITH_LOCK + ["torch"]


def test_macos_takes_pypis_torch(tmp_path):
    command = torch_install_command(tmp_path, system="Darwin", nvidia_smi=None)
    assert index_url(command) is None
    assert command[-1] == "torch"


def test_an_explicit_torch_requirement_adds_no_index_to_reach(tmp_path):
    """CI's command: on a machine without a GPU, pip must find torch==2.13.0 where pip's own
    configuration points (CI's local wheel folder), exactly as before the guess existed."""
    command = torch_install_command(
        tmp_path,
        system="Linux",
        nvidia_smi=None,
        make_args=("TORCH_REQUIREMENT=torch==2.13.0",),
    )
    assert command == PIP_INSTALL_WITH_LOCK + ["torch==2.13.0"]


def test_an_explicit_index_url_wins(tmp_path):
    cuda_index = "https://download.pytorch.org/whl/cu126"
    command = torch_install_command(
        tmp_path, system="Linux", nvidia_smi=None, make_args=(f"TORCH_INDEX_URL={cuda_index}",)
    )
    assert index_url(command) == cuda_index


def test_an_empty_index_url_means_pips_own_index(tmp_path):
    command = torch_install_command(
        tmp_path, system="Linux", nvidia_smi=None, make_args=("TORCH_INDEX_URL=",)
    )
    assert index_url(command) is None
    assert command[-1] == "torch"
