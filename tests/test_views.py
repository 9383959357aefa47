"""What users see is true: byte-identical outputs, complete stage deps, one story in DVC and
MLflow (issue 9). Every check goes through the tools users use: the dvc CLI (--json), git, and
MLflow's client."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ruamel.yaml import YAML

from pipeline import paths
from pipeline.files import write_json
from pipeline.lm.bigram import BigramLanguageModel, save_model
from pipeline.lm.models import load_model
from pipeline.tracking import registry, run_record
from pipeline.tracking.checkpoints import CHECKPOINT_MODEL_TYPE
from testbed import (
    REPO_ROOT,
    commit_all,
    copy_repo_with_store,
    copy_trained_repo,
    make_repo_copy,
    mlflow_runs,
    pipeline_env,
    run,
    run_stage,
    update_params,
)
from tests.support.experiments import Experiments
from tests.support.stages import ENDLESS_TRAINING, dvc_yaml, start_and_wait_for_training
from tests.support.store import model_metrics

STAGES = ("check", "download", "vocab", "train", "evaluate", "register", "sample", "link")
MODEL_NAME = "bigram-shakespeare"


def store(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(repo: Path, stage: str) -> list:
    return [r for r in mlflow_runs(repo) if r.data.tags.get("stage") == stage]


# Complete deps -------------------------------------------------------------------------------


def module_file(module: str) -> Path:
    """The file of a pipeline module: pipeline/lm/bigram.py, or a package's __init__.py."""
    path = REPO_ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def pipeline_imports(module: str) -> set[str]:
    """The pipeline modules one module imports anywhere in it (in functions too)."""
    tree = ast.parse(module_file(module).read_text())
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            named.add(node.module)
            named |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in named if name.startswith("pipeline.") and module_file(name).is_file()}


def import_closure(module: str) -> set[str]:
    """The module, what it imports, directly or not, and the sub-packages above each of them,
    whose __init__.py Python runs first (pipeline.tracking for pipeline.tracking.runs)."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(pipeline_imports(current))
            parts = current.split(".")
            todo.extend(".".join(parts[:depth]) for depth in range(2, len(parts)))
    return seen


def test_each_stage_declares_exactly_the_modules_it_imports():
    """Every pipeline module a stage imports, directly, transitively or inside a function, is a
    dep of the stage, and no other module is: a new import cannot leave a stage stale."""
    stages = dvc_yaml()["stages"]
    assert set(stages) == set(STAGES)
    # The package's __init__ runs first in every stage process, with what it imports.
    package_init = import_closure("pipeline.__init__") - {"pipeline.__init__"}
    for stage, spec in stages.items():
        modules = import_closure(f"pipeline.stages.{stage}") | package_init
        if stage == "register":
            # The registered pyfunc is built from this file, which registry names by path.
            modules |= import_closure("pipeline.tracking.served_model_entry")
        files = {module_file(module).relative_to(REPO_ROOT).as_posix() for module in modules}
        expected = {"pipeline/__init__.py"} | files
        declared = {dep for dep in spec["deps"] if dep.startswith("pipeline/")}
        assert declared == expected, stage


def changed_stages(repo: Path, env: dict) -> set[str]:
    status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
    assert status.pop("link") == ["always changed"]
    return set(status)


def test_editing_code_or_a_sample_param_reruns_exactly_the_affected_stages(trained_repo, tmp_path):
    repo, env = copy_trained_repo(trained_repo[0], tmp_path / "repo"), trained_repo[1]
    assert changed_stages(repo, env) == set()

    model_py = repo / "pipeline/lm/bigram.py"
    original = model_py.read_text()
    model_py.write_text(original + "\n# an edit\n")
    assert changed_stages(repo, env) == {"train", "evaluate", "register", "sample"}
    model_py.write_text(original)

    # The serving code: a new version of the same weights, no training.
    serving_py = repo / "pipeline/tracking/registry.py"
    serving_original = serving_py.read_text()
    serving_py.write_text(serving_original + "\n# an edit\n")
    assert changed_stages(repo, env) == {"register"}
    serving_py.write_text(serving_original)

    # The served model's default temperature is sample.temperature: register logs a new version
    # of the same weights, and nothing retrains. check: every params change is checked first.
    update_params(repo, sample={"temperature": 0.8})
    assert changed_stages(repo, env) == {"check", "register", "sample"}
    dry = run(["dvc", "repro", "--dry"], repo, env).stdout
    assert set(re.findall(r"Running stage '(\w+)'", dry)) == {"check", "register", "sample", "link"}


# Byte-identical outputs --------------------------------------------------------------------


def test_the_same_weights_always_give_the_same_model_file(tmp_path):
    torch.manual_seed(0)
    model = BigramLanguageModel(5)
    save_model(model, tmp_path / "a/model.pt")
    save_model(model, tmp_path / "b/other-name.pt")
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/other-name.pt").read_bytes()
    buffer = io.BytesIO((tmp_path / "a/model.pt").read_bytes())
    assert torch.equal(
        torch.load(buffer)["token_embedding_table.weight"],
        model.state_dict()["token_embedding_table.weight"],
    )


def dvc_outputs(repo: Path) -> dict[str, bytes]:
    lock = YAML(typ="safe", pure=True).load(repo / "dvc.lock")["stages"]
    return {
        out["path"]: (repo / out["path"]).read_bytes()
        for stage in lock.values()
        for out in stage.get("outs", [])
    }


def test_a_forced_repro_gives_the_same_lock_and_outputs_byte_for_byte(trained_repo, tmp_path):
    repo, env = copy_trained_repo(trained_repo[0], tmp_path / "repo"), trained_repo[1]
    before = dvc_outputs(repo)
    lock = (repo / "dvc.lock").read_bytes()

    run(["dvc", "repro", "--force"], repo, env)

    assert (repo / "dvc.lock").read_bytes() == lock
    assert dvc_outputs(repo) == before
    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""
    # Nothing of one machine or run in what DVC hashes.
    assert json.loads((repo / "data/raw/download.json").read_text()).keys() == {"sha256", "bytes"}
    for name, content in before.items():
        if name.endswith((".json", ".csv", ".txt")) and name != "data/raw/input.txt":
            text = content.decode()
            assert "file://" not in text and "127.0.0.1" not in text and "run_id" not in text


@pytest.mark.e2e
def test_a_fresh_copy_of_the_repo_reproduces_the_committed_lock(tmp_path, corpus_url):
    """The committed dvc.lock and metrics come from a real default run; a fresh copy
    of the repository reproduces them exactly. After a change to the pipeline's code or params,
    regenerate them with `make pipeline-lock`."""
    env = pipeline_env(corpus_url)
    repo = make_repo_copy(tmp_path / "repo", env)
    shutil.copy2(REPO_ROOT / "dvc.lock", repo / "dvc.lock")
    commit_all(repo, env, "the committed lock")

    run(["dvc", "repro"], repo, env)

    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""
    assert (repo / "dvc.lock").read_bytes() == (REPO_ROOT / "dvc.lock").read_bytes()


# One story in DVC and MLflow ---------------------------------------------------------------


def param_names(repo: Path) -> set[str]:
    params = YAML(typ="safe", pure=True).load(repo / "params.yaml")
    return {f"{section}.{key}" for section, values in params.items() for key in values}


def test_a_plain_repro_run_is_named_and_logs_each_param_once_as_dvc_names_it(trained_repo):
    repo, env = trained_repo
    (training,) = runs_of(repo, "train")
    commit = run(["git", "rev-parse", "--short", "HEAD~1"], repo, env).stdout.strip()
    assert training.info.run_name == f"main@{commit}"
    # The params training reads (of the model section, a bigram's only param: model.type); the
    # sample params, the served model's, on register and sample.
    names = param_names(repo)
    read = {n for n in names if n.startswith(("data.", "train."))} | {"model.type"}
    assert set(training.data.params) == read
    assert training.data.params["train.seed"] == "7" and "lr" not in training.data.params
    for stage in ("register", "sample"):
        (child,) = runs_of(repo, stage)
        assert set(child.data.params) == {n for n in names if n.startswith("sample.")}, stage


def exp_show(repo: Path, env: dict) -> dict[str, dict]:
    """{experiment name: {"metrics": its metrics files, "params": its params files}} from
    `dvc exp show --json`."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    return {
        exp["name"]: exp["revs"][0]["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
    }


@pytest.mark.e2e
def test_exp_show_names_the_mlflow_run_of_every_experiment_restored_ones_too(experiments):
    repo, env = experiments.repo, experiments.env
    first, second, restored = experiments.first, experiments.second, experiments.restored
    assert "Running stage 'train'" not in experiments.restored_stdout

    trainings = {r.data.tags["dvc.exp_name"]: r for r in runs_of(repo, "train")}
    assert set(trainings) == {first, second}, "a restored experiment trains nothing"
    for name, training in trainings.items():
        assert training.info.run_name == name and training.info.status == "FINISHED"
    shown = exp_show(repo, env)
    run_ids = {
        name: shown[name]["params"]["data/train/run.json"]["data"]["mlflow_run_id"]
        for name in shown
    }
    assert run_ids == {
        first: trainings[first].info.run_id,
        second: trainings[second].info.run_id,
        restored: trainings[first].info.run_id,
    }
    for name in (first, second):
        metrics = shown[name]["metrics"]["data/evaluate/metrics.json"]["data"]
        assert trainings[name].data.metrics["val_loss"] == pytest.approx(metrics["val_loss"])

    # The registry: lr 0.05 trains better in 300 steps than 0.005, so the champion stays.
    client = store(repo)
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == "2"


# Comparison views: what a user reads in a 160-column terminal --------------------------------

TERMINAL_COLUMNS = 160
# What the README's `dvc exp show` shows of the experiments fixture, where only train.lr changed.
COMPARED_COLUMNS = ("Experiment", "Created", "train_loss", "val_loss", "train.lr", "mlflow_run_id")


def readme_command(prefix: str) -> list[str]:
    """The command of the README's Experiments section that starts with prefix, as argv: the
    tests run what the README says."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Experiments\n", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith(prefix)]
    return shlex.split(line, comments=True)


def in_terminal(experiments: Experiments, command: list[str]):
    """Run a dvc command as in a 160-column terminal; DVC's failure lines go to stderr."""
    return run(command, experiments.repo, {**experiments.env, "COLUMNS": str(TERMINAL_COLUMNS)})


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each line of a DVC table (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@pytest.mark.e2e
def test_the_readme_exp_show_fits_160_columns_with_changed_params_losses_and_run_ids(
    experiments,
):
    shown = in_terminal(experiments, readme_command("dvc exp show")).stdout
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= TERMINAL_COLUMNS, shown
    # Nothing folded into DVC's "…" column: every column the comparison needs, and no other.
    (header,) = [line.split() for line in lines if "Experiment" in line]
    assert header == [*COMPARED_COLUMNS]
    trainings = {r.data.tags["dvc.exp_name"]: r for r in runs_of(experiments.repo, "train")}
    rows = {
        name: line
        for line in lines
        for name in (experiments.first, experiments.second, experiments.restored)
        if f"[{name}]" in line
    }
    for name, lr, trained_by in (
        (experiments.first, "0.05", experiments.first),
        (experiments.second, "0.005", experiments.second),
        (experiments.restored, "0.05", experiments.first),
    ):
        cells = rows[name].split()
        assert cells[-2:] == [lr, trainings[trained_by].info.run_id], rows[name]
        assert all(is_number(cell) for cell in cells[-4:-2]), rows[name]  # train and val loss


@pytest.mark.e2e
def test_metrics_show_and_diff_print_only_numbers_and_no_failure_line(experiments):
    """run.json's run id is a params file's, not a metric: the metrics views hold numbers only,
    and a revision without run.json (main commits none) is no failure."""
    metric_names = set(json.loads((experiments.repo / paths.METRICS_PATH).read_text()))
    shown = in_terminal(experiments, readme_command("dvc metrics show"))
    assert "failed" not in shown.stderr, shown.stderr
    header, *values = table_rows(shown.stdout)
    assert header[0] == "Path" and set(header[1:]) == metric_names
    assert values and all(is_number(cell) for row in values for cell in row[1:]), shown.stdout

    for revisions in ([], ["main", experiments.second]):
        diff = in_terminal(experiments, ["dvc", "metrics", "diff", *revisions])
        assert "failed" not in diff.stderr, (revisions, diff.stderr)
        header, *changes = table_rows(diff.stdout)
        assert header[:2] == ["Path", "Metric"] and changes, diff.stdout
        for _path, metric, *numbers in changes:
            assert metric in metric_names and all(map(is_number, numbers)), diff.stdout

    # The README's `dvc params diff`: what changed, without the run id main lacks.
    params = in_terminal(experiments, readme_command("dvc params diff"))
    assert "failed" not in params.stderr and "mlflow_run_id" not in params.stdout
    assert "train.lr" in params.stdout


def test_run_json_holds_the_run_id_alone_and_the_model_sha256_counts_for_its_run_only(
    tmp_path, monkeypatch
):
    """Every key of run.json is a column of `dvc exp show`: the model's sha256, which the link
    stage's fast path compares, is beside it, valid only for the run it was recorded for."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    paths.RUN_INFO_PATH.parent.mkdir(parents=True)
    trained, other = "a" * 32, "b" * 32
    run_record.write_run_record(trained, "f" * 64)
    assert json.loads(paths.RUN_INFO_PATH.read_text()) == {"mlflow_run_id": trained}
    assert run_record.recorded_run() == (trained, "f" * 64)
    # As after `dvc exp apply` of another experiment, whose commit holds its own run.json: the
    # sha256 is unknown, so the link stage looks the run of the model up.
    write_json(paths.RUN_INFO_PATH, {"mlflow_run_id": other})
    assert run_record.recorded_run() == (other, None)
    paths.RUN_INFO_PATH.unlink()
    assert run_record.recorded_run() == (None, None)


def test_logged_models_and_versions_show_the_final_losses_linked_to_the_datasets(trained_repo):
    repo, _ = trained_repo
    (training,) = runs_of(repo, "train")
    client = store(repo)
    final = (repo / "data/train/loss_curve.csv").read_text().strip().splitlines()[-1]
    step, train_loss, val_loss = (float(value) for value in final.split(","))
    evaluated = json.loads((repo / "data/evaluate/metrics.json").read_text())
    # Logged by the register stage, and outputs of the training run, whose page lists them.
    outputs = client.get_run(training.info.run_id).outputs.model_outputs
    logged = [client.get_logged_model(output.model_id) for output in outputs]
    # Besides the checkpoints, which the next test reads.
    logged = [model for model in logged if model.model_type != CHECKPOINT_MODEL_TYPE]
    assert {model.name for model in logged} == {"model", "generator"}
    for model in logged:
        metrics = {m.key: m for m in model.metrics}
        assert set(metrics) == set(evaluated), model.name
        assert all(metrics[name].value == value for name, value in evaluated.items())
        assert metrics["train_loss"].value == train_loss and metrics["val_loss"].value == val_loss
        assert {m.step for m in metrics.values()} == {int(step)}
        assert metrics["train_loss"].dataset_name == "shakespeare-train"
        assert metrics["val_loss"].dataset_name == "shakespeare-val"
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == training.info.run_id
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == str(version.version)
    generator = next(model for model in logged if model.name == "generator")
    assert version.source == f"models:/{generator.model_id}"  # the logged model, final losses
    assert float(version.tags["val_loss"]) == pytest.approx(val_loss, abs=1e-6)


def test_the_logged_models_page_lists_each_checkpoint_with_its_losses(trained_repo):
    """One logged model per eval point but the first and the last (train.checkpoint_every: 1),
    an output of the training run at its step, with that point's losses linked to the splits;
    the weights in it are a model.pt that loads."""
    repo, _ = trained_repo
    (training,) = runs_of(repo, "train")
    client = store(repo)
    curve = (repo / "data/train/loss_curve.csv").read_text().strip().splitlines()[1:]
    points = {int(float(row.split(",")[0])): row.split(",")[1:] for row in curve}
    found = client.search_logged_models(
        [training.info.experiment_id],
        filter_string=f"source_run_id = '{training.info.run_id}'",
    )
    checkpoints = {m.name: m for m in found if m.model_type == CHECKPOINT_MODEL_TYPE}
    assert sorted(checkpoints) == ["checkpoint-100", "checkpoint-200"]
    outputs = client.get_run(training.info.run_id).outputs.model_outputs
    assert {(o.model_id, o.step) for o in outputs} >= {
        (m.model_id, int(name.split("-")[1])) for name, m in checkpoints.items()
    }
    vocab_size = len(json.loads((repo / "data/vocab/vocab.json").read_text())["chars"])
    for name, model in checkpoints.items():
        step = int(name.split("-")[1])
        assert model.status.name == "READY"
        metrics = {m.key: m for m in model.metrics}
        assert set(metrics) == {"train_loss", "val_loss"}
        assert [metrics[k].value for k in ("train_loss", "val_loss")] == [
            float(value) for value in points[step]
        ]
        assert {m.step for m in metrics.values()} == {step}
        assert metrics["val_loss"].dataset_name == "shakespeare-val"
        weights = Path(urllib.parse.urlparse(model.artifact_location).path) / "model.pt"
        assert load_model(weights, vocab_size).vocab_size == vocab_size


def test_champion_moves_only_to_a_version_with_a_lower_val_loss(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("aliases")
    client.create_registered_model(MODEL_NAME)
    champions = []
    for val_loss in (2.6, 2.7, 2.5, 2.5):
        run_id = client.create_run(experiment_id).info.run_id
        client.log_metric(run_id, "val_loss", val_loss)
        version = str(client.create_model_version(MODEL_NAME, "file:///nowhere", run_id).version)
        registry.set_aliases(client, MODEL_NAME, version, val_loss)
        assert str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == version
        champions.append(str(client.get_model_version_by_alias(MODEL_NAME, "champion").version))
    assert champions == ["1", "1", "3", "3"]


# Truthful run status -----------------------------------------------------------------------


def test_evaluate_and_sample_log_into_child_runs_and_fail_on_their_own(trained_repo, tmp_path):
    # The shared trained repo's store, whose train and evaluate runs its `dvc repro` made.
    repo, env = copy_repo_with_store(trained_repo[0], tmp_path / "repo"), trained_repo[1]
    (training,) = runs_of(repo, "train")
    (evaluation,) = runs_of(repo, "evaluate")
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert evaluation.info.status == "FINISHED"
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    # The training run's own system metrics aside, it holds evaluate's exactly.
    assert model_metrics(store(repo).get_run(training.info.run_id)) == pytest.approx(metrics)

    sampled = {found.info.run_id for found in runs_of(repo, "sample")}
    shutil.rmtree(repo / "data/sample")
    (repo / "data/sample").write_text("a file where the stage needs a directory")
    result = run_stage("sample", repo, env)
    assert result.returncode != 0
    (sampling,) = [found for found in runs_of(repo, "sample") if found.info.run_id not in sampled]
    assert sampling.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert sampling.info.status == "FAILED"
    statuses = {r.info.run_id: r.info.status for r in mlflow_runs(repo)}
    assert statuses[training.info.run_id] == "FINISHED", "the training run keeps its status"


def test_sighup_during_training_is_handled_like_sigterm(prepared_copy):
    repo, env = prepared_copy
    update_params(repo, train=ENDLESS_TRAINING)
    training = start_and_wait_for_training(
        [sys.executable, "-m", "pipeline.stages.train"], repo, env
    )
    try:
        training.send_signal(signal.SIGHUP)
        _, stderr = training.communicate(timeout=60)
    finally:
        training.kill()
    assert training.returncode == 130
    assert stderr.strip() == (
        "error: stopped by signal SIGHUP; no partial output was left, rerun the stage"
    )
    assert not (repo / "data/train/model.pt").exists()
    (killed,) = runs_of(repo, "train")
    assert killed.info.status == "KILLED"


@pytest.mark.e2e
def test_a_sigkilled_training_run_is_ended_by_a_repro_in_which_every_stage_is_cached(
    trained_repo, tmp_path
):
    # The trained repo's store, with its one finished training run (no second training for it).
    repo, env = copy_repo_with_store(trained_repo[0], tmp_path / "repo"), trained_repo[1]
    fast = YAML(typ="safe", pure=True).load(repo / "params.yaml")["train"]
    update_params(repo, train=ENDLESS_TRAINING)
    repro = start_and_wait_for_training(["dvc", "repro"], repo, env)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.communicate(timeout=60)
    assert [r.info.status for r in runs_of(repo, "train")] == ["FINISHED", "RUNNING"]

    update_params(repo, train=fast)
    result = run(["dvc", "repro"], repo, env)

    # check: the killed repro had recorded the endless params for it in dvc.lock.
    assert re.findall(r"Running stage '(\w+)'", result.stdout) == ["check", "link"], result.stdout
    assert [r.info.status for r in runs_of(repo, "train")] == ["FINISHED", "KILLED"]
    assert "RUNNING" not in {r.info.status for r in mlflow_runs(repo)}


def test_the_link_stage_of_a_no_op_repro_is_cheap(trained_repo):
    """It runs on every `dvc repro`: without MLflow or torch when there is nothing to do."""
    repo, env = trained_repo
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        result = run([sys.executable, "-X", "importtime", "-m", "pipeline.stages.link"], repo, env)
        timings.append(time.perf_counter() - started)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "mlflow" not in imported and "torch" not in imported
    assert min(timings) < 0.5, timings


# Plots and metrics files -------------------------------------------------------------------


def test_plots_show_draws_one_loss_chart_and_the_heatmap_once(trained_repo):
    repo, env = trained_repo
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo, env).stdout)
    plots = shown.get("data", shown)
    assert set(plots) == {"data/train/loss_curve.csv", "data/evaluate/next_char_probs.png"}
    assert len(plots["data/evaluate/next_char_probs.png"]) == 1
    (chart,) = plots["data/train/loss_curve.csv"]
    spec = json.dumps(chart["content"])
    assert '"step"' in spec and "train_loss" in spec and "val_loss" in spec
    values = chart["content"]["data"]["values"]
    assert {row["step"] for row in values} == {"0", "100", "200", "300"}
    # One row per point, with both columns: the template draws train_loss beside val_loss.
    assert all({"train_loss", "val_loss"} <= row.keys() for row in values)


def test_metrics_are_read_from_git_and_run_json_is_a_params_file(trained_repo):
    """metrics.json and the loss curve are small files DVC reads from git (cache: false), so
    `dvc plots diff main <exp>` finds every revision's curve without the cache; as a stage plot
    the curve keeps DVC's run-cache for train. run.json, with the MLflow run id, is a top-level
    params file: a metric of text would widen `dvc metrics show` and fail `dvc metrics diff`."""
    repo, env = trained_repo
    spec = dvc_yaml(repo)
    assert spec["stages"]["evaluate"]["metrics"] == [
        {"data/evaluate/metrics.json": {"cache": False}}
    ]
    (curve,) = spec["stages"]["train"]["plots"]
    assert curve["data/train/loss_curve.csv"]["cache"] is False
    tracked = run(["git", "ls-files", "data"], repo, env).stdout.split()
    assert tracked == ["data/evaluate/metrics.json", "data/train/loss_curve.csv"]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    assert [set(rev["data"]) for rev in metrics.values()] == [{"data/evaluate/metrics.json"}]
    assert spec["params"] == ["data/train/run.json"] and "metrics" not in spec
    assert list((repo / ".dvc/cache/runs").iterdir()), "the run-cache is in use"


def test_paths_module_names_the_paths_dvc_yaml_declares():
    spec = dvc_yaml()
    declared = set(spec.get("params", []))
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    named = {str(value) for name, value in vars(paths).items() if name.endswith("_PATH")}
    assert named == declared


def test_committed_outputs_are_those_of_the_default_run():
    """metrics.json and the loss curve in git belong to the committed dvc.lock."""
    import hashlib

    lock = YAML(typ="safe", pure=True).load(REPO_ROOT / "dvc.lock")["stages"]
    recorded = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}
    for name in ("data/evaluate/metrics.json", "data/train/loss_curve.csv"):
        content = (REPO_ROOT / name).read_bytes()
        assert hashlib.md5(content).hexdigest() == recorded[name], name
