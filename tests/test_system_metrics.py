"""System metrics (issue 20): MLflow's monitor on every training run, paced to the run's length,
switched off by MLflow's own variable. The monitor runs for real against a real SQLite store;
the train stage's runs are checked in test_mlflow_views."""

from __future__ import annotations

import time
from collections.abc import Iterator

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.tracking.system_metrics import (
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    PREFIX,
    RunMonitor,
    system_metrics,
)
from tests.support.store import CPU_SYSTEM_METRICS


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[MlflowClient]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(previous)


def monitored_run(store: MlflowClient, seconds: float) -> dict[str, list]:
    """A run monitored for seconds; its system metrics' histories."""
    with mlflow.start_run() as run, system_metrics(run.info.run_id) as pace:
        time.sleep(seconds)
        pace(1.0)
    keys = [k for k in store.get_run(run.info.run_id).data.metrics if k.startswith(PREFIX)]
    return {key: store.get_metric_history(run.info.run_id, key) for key in keys}


def test_a_run_shorter_than_one_interval_still_gets_its_sample(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    histories = monitored_run(store, 0.1)
    assert histories.keys() >= CPU_SYSTEM_METRICS
    assert all([m.step for m in history] == [0] for history in histories.values())


def test_a_longer_run_gets_a_sample_per_interval(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    histories = monitored_run(store, 2.5 * MIN_INTERVAL_S)
    steps = [m.step for m in histories["system/cpu_utilization_percentage"]]
    assert steps == list(range(len(steps))) and 2 <= len(steps) <= 4, steps


def test_mlflows_variable_switches_the_monitor_off(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert monitored_run(store, 0.1) == {}


def test_the_interval_is_the_predicted_run_length_over_a_hundred_within_bounds(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    with mlflow.start_run() as run:
        monitor = RunMonitor(run.info.run_id)  # never started: pace alone
    assert monitor.sampling_interval == MIN_INTERVAL_S
    monitor.started = time.monotonic() - 50
    monitor.pace(0.25)  # 200 s predicted
    assert monitor.sampling_interval == pytest.approx(2.0, rel=1e-3)
    monitor.pace(0.001)  # 50,000 s predicted
    assert monitor.sampling_interval == MAX_INTERVAL_S
    monitor.pace(1.0)  # 50 s
    assert monitor.sampling_interval == MIN_INTERVAL_S

    # MLflow's own variable fixes the interval instead.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "3")
    with mlflow.start_run() as run:
        fixed = RunMonitor(run.info.run_id)
    fixed.started = time.monotonic() - 50
    fixed.pace(0.25)
    assert fixed.sampling_interval == 3
