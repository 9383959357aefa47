"""What runs left in an MLflow store."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from pipeline.tracking.rebuild import DEPS_ARTIFACT
from testbed import mlflow_runs

# The system metrics MLflow samples on any machine (a GPU's need nvidia-ml-py and the GPU).
CPU_SYSTEM_METRICS = frozenset(
    {
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage",
        "system/disk_usage_megabytes",
        "system/network_receive_megabytes",
    }
)


def model_metrics(run) -> dict[str, float]:
    """A run's metrics but the system metrics of the machine it ran on (CPU, memory, ...)."""
    return {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}


def client_for(repo: Path) -> MlflowClient:
    """A client on the repo copy's SQLite store."""
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def recorded_deps(client: MlflowClient, run_id: str) -> tuple[dict[str, str], bytes]:
    """A training run's rebuild/deps.json, fetched from its artifacts: (dep -> md5, its bytes)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(client.download_artifacts(run_id, DEPS_ARTIFACT, directory))
        data = path.read_bytes()
    return json.loads(data), data


def train_runs(repo: Path) -> list:
    """The train stage's runs in the repo's store, oldest first."""
    return [found for found in mlflow_runs(repo) if found.data.tags["stage"] == "train"]
