"""A stage is quiet about MLflow (issue 17): no MLflow warning, INFO line or progress bar in a
normal run's output, and MLflow's usage telemetry off unless the user turns it on.

The train and register stages run for real (`python -m pipeline.stages.train`, as DVC runs them)
with PROBE as the process's sitecustomize: Python loads it at start-up, before the stage, and it
reports MLflow's
switches as the environment held them when the stage imported mlflow, which is when MLflow
reads them (MLflow decides then whether to make its telemetry client), and at exit.
"""

from __future__ import annotations

import json
import os

from testbed import run_stage

SWITCHES = (
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_LOGGING_LEVEL",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)
PROBE_PREFIX = "mlflow switches: "
PROBE = f"""
import atexit, json, os, sys

SWITCHES = {SWITCHES!r}
seen = {{}}


def on_import(event, args):
    if event == "import" and args[0] == "mlflow" and "at_mlflow_import" not in seen:
        seen["at_mlflow_import"] = {{name: os.environ.get(name) for name in SWITCHES}}


def report():
    seen["at_exit"] = {{name: os.environ.get(name) for name in SWITCHES}}
    print({PROBE_PREFIX!r} + json.dumps(seen), file=sys.stderr)


atexit.register(report)  # First registered, so it runs last.
sys.addaudithook(on_import)
"""


def probed_stage(stage: str, repo, env: dict[str, str], probe_dir) -> tuple[str, dict]:
    """Run a stage with PROBE; its output without the probe's line, and what the probe saw."""
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    path = os.pathsep.join(filter(None, (str(probe_dir), env.get("PYTHONPATH"))))
    result = run_stage(stage, repo, {**env, "PYTHONPATH": path}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    lines = output.splitlines()
    probed = [line for line in lines if line.startswith(PROBE_PREFIX)]
    assert len(probed) == 1, output[-4000:]
    rest = "\n".join(line for line in lines if not line.startswith(PROBE_PREFIX))
    return rest, json.loads(probed[0].removeprefix(PROBE_PREFIX))


def test_train_and_register_print_nothing_of_mlflow_and_send_no_telemetry(prepared_copy, tmp_path):
    repo, env = prepared_copy
    # As a user's shell has it: pytest's own variable would make MLflow skip telemetry anyway.
    env.pop("PYTEST_CURRENT_TEST", None)

    trained, _ = probed_stage("train", repo, env, tmp_path / "probe")
    run_stage("evaluate", repo, env, timeout=300)
    output, seen = probed_stage("register", repo, env, tmp_path / "probe")

    # MLflow's pickle warning, its INFO lines and its tqdm bars while register logs the models.
    for noise in ("WARNING mlflow", "INFO mlflow", "Downloading artifacts"):
        assert noise not in trained, trained
        assert noise not in output, output
    assert "train loss" in trained, trained
    assert "registered bigram-shakespeare version 1 @champion @challenger" in output, output
    # Off before MLflow loads: it never makes the telemetry client, never starts its threads.
    assert seen["at_mlflow_import"] == {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }, seen

    # The user's own settings win: telemetry and the progress bars can be turned back on. The
    # check stage, quick, starts as every stage does.
    chosen = {"MLFLOW_DISABLE_TELEMETRY": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"}
    _, seen = probed_stage("check", repo, {**env, **chosen}, tmp_path / "probe")
    assert seen["at_exit"] == {**chosen, "MLFLOW_LOGGING_LEVEL": "WARNING"}, seen
