"""What a training run needs to be rebuilt, recorded as tags and one artifact of the run.

- ``git.dirty``: whether tracked files differ from the commit (``mlflow.source.git.commit``,
  which pipeline.tracking sets on every stage's run), ``git.changed_files`` naming them.
  dvc.lock, metrics.json and the loss curve are left out: `dvc repro` rewrites them as stages
  run, and the inputs dvc.lock records are hashed here instead.
- ``rebuild/deps.json``, an artifact of the run: the md5 of each dep of the train stage (dep
  path -> md5), the hashes `dvc repro` writes for it in dvc.lock. One file, not one tag a dep:
  MLflow's runs table shows every tag as a column. ``rebuild.deps_sha256``, the sha256 of its
  bytes, finds runs made from the same inputs (``tags.`rebuild.deps_sha256` = '...'``).
- ``version.python``, ``version.torch``, ``version.dvc``, ``version.mlflow`` and
  ``device.name``.
- ``cpu.capability`` (the kernel level torch dispatched to: DEFAULT in every stage),
  ``cpu.pins`` (the environment pipeline.determinism pins) and ``torch.threads``.

The params are logged on the run beside them. Checking out the commit, setting the run's params
and running ``dvc repro`` rebuilds the run; on the CPU its metrics are identical.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

import mlflow
import torch

from pipeline import git
from pipeline.determinism import pins_description
from pipeline.paths import LOSS_CURVE_PATH, METRICS_PATH

DVC_FILE = Path("dvc.yaml")
TRAIN_STAGE = "train"
# Rewritten by `dvc repro` itself while the pipeline runs (dvc.lock, and the stage outputs git
# holds, which DVC removes before their stage reruns): not a change to the code or data.
NOT_SOURCE = {"dvc.lock", str(METRICS_PATH), str(LOSS_CURVE_PATH)}
CHUNK_BYTES = 1 << 20
DEPS_ARTIFACT = "rebuild/deps.json"
DEPS_TAG = "rebuild.deps_sha256"


def changed_files() -> list[str] | None:
    """Tracked files that differ from HEAD (dvc.lock aside), or None outside a git repo."""
    changed = git.changed_tracked_files()
    return None if changed is None else [path for path in changed if path not in NOT_SOURCE]


def file_md5(path: Path) -> str:
    """The md5 DVC records for a file dep: of its bytes, as they are."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stage_deps(stage: str = TRAIN_STAGE) -> list[str]:
    """The deps of a dvc.yaml stage, as declared."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(DVC_FILE)["stages"][stage].get("deps", [])


def stage_dep_hashes(stage: str = TRAIN_STAGE) -> dict[str, str]:
    """md5 of each file dep of a dvc.yaml stage (the train stage's deps are all files)."""
    return {dep: file_md5(Path(dep)) for dep in stage_deps(stage) if Path(dep).is_file()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_name()


def cpu_name() -> str:
    # platform.processor() is empty on most Linux machines; /proc/cpuinfo has the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def deps_record(stage: str = TRAIN_STAGE) -> str:
    """The text of rebuild/deps.json: dep path -> md5, sorted, one line each."""
    return json.dumps(stage_dep_hashes(stage), indent=2, sort_keys=True) + "\n"


def record(device: torch.device) -> dict[str, str]:
    """The run's rebuild record: logs rebuild/deps.json into the active run and returns the
    tags (the JSON's sha256 among them)."""
    deps = deps_record()
    mlflow.log_text(deps, DEPS_ARTIFACT)
    changed = changed_files()
    tags = {
        "git.dirty": "unknown" if changed is None else str(bool(changed)).lower(),
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.dvc": package_version("dvc"),
        "version.mlflow": mlflow.__version__,
        "device.name": device_name(device),
        "cpu.capability": torch.backends.cpu.get_cpu_capability(),
        "cpu.pins": pins_description(),
        "torch.threads": str(torch.get_num_threads()),
        DEPS_TAG: hashlib.sha256(deps.encode()).hexdigest(),
    }
    if changed:
        tags["git.changed_files"] = ", ".join(changed)
    return tags
