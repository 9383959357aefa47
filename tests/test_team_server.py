"""Team mode: the pipeline logs through a real `mlflow server`, on SQLite or PostgreSQL.

The tests start and stop every process themselves on 127.0.0.1: a throwaway PostgreSQL cluster
(Debian's postgresql package, which .ci/run installs), the tracking server with
--serve-artifacts, and `mlflow models serve` for the registered model.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.errors import PipelineError
from pipeline.secrets import masked
from pipeline.tracking import lineage, store
from pipeline.tracking.checkpoints import CHECKPOINT_MODEL_TYPE
from testbed import VENV_BIN, background, copy_trained_repo, free_port, mlflow_server, run
from tests.support.experiments import (
    check_experiments_in_store,
    check_registry,
    failed_task_logs,
    queue,
    start_queue,
    training_runs,
    wait_for_queue,
)
from tests.support.faults import files_holding
from tests.support.servers import request_json

pytestmark = pytest.mark.e2e

MODEL_URI = "models:/bigram-shakespeare@champion"


def postgres_bin_dir() -> Path:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert candidates, (
        "PostgreSQL is not installed: `apt-get install postgresql` (Debian), which .ci/run does"
    )
    return Path(candidates[-1]).parent


@contextlib.contextmanager
def postgres_cluster(password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty `mlflow` database; yields its
    URI. With a password, connections over TCP must give it (scram-sha-256).

    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
    """
    bin_dir = postgres_bin_dir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="bigram-pg-"))
    if as_postgres:
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()

    def pg(*args: str) -> None:
        done = subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}{done.stderr}"

    auth = ["--auth=trust"]
    if password is not None:
        password_file = base / "password"
        password_file.write_text(password)
        if as_postgres:
            shutil.chown(password_file, "postgres")
        # The local socket (createdb below) stays trusted.
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"]
    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", *auth, "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off"
    pg(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(base / "log"),
        "-o",
        options,
        "-w",
        "start",
    )
    try:
        pg(str(bin_dir / "createdb"), "-h", str(base), "-p", str(port), "-U", "postgres", "mlflow")
        # The form MLflow's documentation shows: SQLAlchemy picks psycopg 3 (the postgres extra).
        user = "postgres" if password is None else f"postgres:{password}"
        yield f"postgresql://{user}@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_uri() -> Iterator[str]:
    with postgres_cluster() as uri:
        yield uri


def runs_by_stage(client: MlflowClient) -> dict[str, list]:
    experiment = client.get_experiment_by_name("bigram")
    grouped: dict[str, list] = {}
    for found in client.search_runs([experiment.experiment_id]):
        grouped.setdefault(found.data.tags["stage"], []).append(found)
    return grouped


def stored_files(directory: Path) -> set[str]:
    """The paths of the files under a server's artifacts directory, relative to it."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def check_run_on_server(training, url: str, stored: set[str]) -> None:
    """A training run's artifacts and models, as the server holds them and `mlflow ui` shows
    them: its page, and the runs and artifacts the page asks the server for. stored: the files
    in the server's artifacts destination, relative to it (a directory's or a bucket's)."""
    client = MlflowClient(tracking_uri=url)
    run_id = training.info.run_id
    # Artifacts went through the server (mlflow-artifacts:/) into its destination directory.
    assert training.info.artifact_uri.startswith("mlflow-artifacts:/")
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss_curve.csv", "metrics.json", "next_char_probs.png", "samples"} <= listed
    experiment = training.info.experiment_id

    def stored_under(prefix: str, name: str) -> bool:
        return any(p.startswith(f"{prefix}/") and p.endswith(f"/{name}") for p in stored)

    assert stored_under(f"{experiment}/{run_id}", "loss_curve.csv")
    # The register stage's models, outputs of the training run too.
    outputs = client.get_run(run_id).outputs.model_outputs
    logged = [client.get_logged_model(output.model_id) for output in outputs]
    checkpoints = [m for m in logged if m.model_type == CHECKPOINT_MODEL_TYPE]
    assert sorted(m.name for m in checkpoints) == ["checkpoint-100", "checkpoint-200"]
    logged = [m for m in logged if m.model_type != CHECKPOINT_MODEL_TYPE]
    assert {m.name for m in logged} == {"model", "generator"}
    for model in checkpoints:
        assert stored_under(f"{experiment}/models/{model.model_id}", "model.pt"), model.name
    for model in logged:
        assert stored_under(f"{experiment}/models/{model.model_id}", "MLmodel"), model.name

    status, page = request_json(f"{url}/")
    assert status == 200 and "<html" in page.lower() and "Unable to display" not in page
    status, body = request_json(
        f"{url}/ajax-api/2.0/mlflow/runs/search",
        {"experiment_ids": [training.info.experiment_id]},
    )
    assert status == 200 and run_id in body
    status, body = request_json(f"{url}/get-artifact?path=metrics.json&run_uuid={run_id}")
    assert status == 200
    for name, value in json.loads(body).items():
        assert training.data.metrics[name] == pytest.approx(value, rel=1e-12), name


def test_pipeline_through_a_server_on_postgresql_and_s3(trained_repo, tmp_path, postgres_uri, s3):
    """`dvc repro` logs every stage through the server, PostgreSQL behind it and its artifacts
    in an S3 bucket; the registered model then generates through the generate command and
    through `mlflow models serve`. Only the server has the S3 credentials."""
    repo = copy_trained_repo(trained_repo[0], tmp_path / "repo")
    bucket = s3.new_bucket("mlflow-artifacts-test")
    server_env = {**trained_repo[1], **s3.credentials, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    destination = f"s3://{bucket}/mlflow"
    with mlflow_server(postgres_uri, tmp_path, server_env, destination) as url:
        env = {**trained_repo[1], "MLFLOW_TRACKING_URI": url}
        result = run(["dvc", "repro", "--force"], repo, env)
        for stage in ("download", "vocab", "train", "evaluate", "sample"):
            assert f"Running stage '{stage}'" in result.stdout

        client = MlflowClient(tracking_uri=url)
        stages = runs_by_stage(client)
        assert {stage: len(found) for stage, found in stages.items()} == {
            "download": 1,
            "vocab": 1,
            "train": 1,
            "evaluate": 1,
            "register": 1,
            "sample": 1,
        }
        assert {r.info.status for found in stages.values() for r in found} == {"FINISHED"}
        (training,) = stages["train"]
        metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
        for name, value in metrics.items():
            assert training.data.metrics[name] == pytest.approx(value, rel=1e-12), name
        assert training.data.params["train.max_iters"] == "300"
        stored = {key.removeprefix("mlflow/") for key in s3.keys(bucket, "mlflow/")}
        check_run_on_server(training, url, stored)
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()
        (version,) = client.search_model_versions("name = 'bigram-shakespeare'")
        assert version.version == "1"
        assert version.tags["training_run_id"] == training.info.run_id
        assert float(version.tags["val_loss"]) == pytest.approx(
            training.data.metrics["val_loss"], abs=1e-6
        )

        generated = run(
            [sys.executable, "-m", "pipeline.generate", "--model", MODEL_URI]
            + ["--prompt", "ROMEO:", "--chars", "300"],
            repo,
            env,
        ).stdout.removesuffix("\n")
        vocab = set(json.loads((repo / "data/vocab/vocab.json").read_text())["chars"])
        assert generated.startswith("ROMEO:") and len(generated) == 306
        assert set(generated) <= vocab

        port = free_port()
        serve = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", MODEL_URI]
        serve += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
        with background(serve, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env):
            invocations = f"http://127.0.0.1:{port}/invocations"
            status, body = request_json(
                invocations, {"dataframe_records": [{"prompt": "ROMEO:", "chars": 300}]}
            )
            assert status == 200, body
            # Same model, same seed (sample.seed) and temperature: the same text as the command.
            assert json.loads(body) == {"predictions": [generated]}
            status, body = request_json(
                invocations, {"dataframe_records": [{"prompt": "A"}, {"prompt": "B"}]}
            )
            assert status == 200, body
            texts = json.loads(body)["predictions"]
            # chars left out: the training's sample.num_chars.
            assert [text[0] for text in texts] == ["A", "B"] and {len(t) for t in texts} == {201}

            status, body = request_json(invocations, {"dataframe_records": [{"prompt": "ROMEO@é"}]})
            assert status == 400 and "'@', 'é'" in json.loads(body)["message"]

        # The S3 secret stayed in the server's environment: in no run, output, log or file.
        for found in client.search_runs([training.info.experiment_id]):
            assert s3.secret_key not in json.dumps([found.data.tags, found.data.params])
    assert s3.secret_key not in result.stdout + result.stderr
    logs = [tmp_path / "server.log", tmp_path / "serve.log"]
    assert not files_holding(s3.secret_key, repo, *logs)


def test_two_queue_workers_log_through_a_server_on_sqlite_which_fails_fast_when_stopped(
    trained_repo, tmp_path, monkeypatch
):
    """`dvc queue start -j 2` with MLFLOW_TRACKING_URI at a SQLite-backed server: both
    experiments land there whole; once the server is gone a stage stops at once, naming it."""
    repo = copy_trained_repo(trained_repo[0], tmp_path / "repo")
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend, tmp_path, trained_repo[1]) as url:
        # Stages starting together all find no experiment and all create it: one does, and
        # the others use it (queue workers met this as RESOURCE_ALREADY_EXISTS).
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with ThreadPoolExecutor(max_workers=4) as pool:
            experiment_ids = set(pool.map(lambda _: store.connect("bigram"), range(4)))
        assert len(experiment_ids) == 1

        env = {**trained_repo[1], "MLFLOW_TRACKING_URI": url}
        names = queue(repo, env, ["train.lr=1.5e-2", "train.batch_size=48"])
        start_queue(repo, env, jobs=2)
        status = wait_for_queue(repo, env, experiments=2)
        assert status.count("Success") == 2, status + failed_task_logs(repo, env, status)

        client = MlflowClient(tracking_uri=url)
        runs = check_experiments_in_store(client, repo, env, names)
        assert len(training_runs(client)) == 2
        check_registry(client, runs)
        for training in runs:
            check_run_on_server(training, url, stored_files(tmp_path / "artifacts"))
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()

    stage = ["dvc", "repro", "--force", "--single-item", "train"]
    result = run(stage, repo, env, check=False, timeout=90)
    assert result.returncode != 0
    assert f"error: MLflow tracking server {url} is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_starting_together_each_link_the_same_new_dataset(tmp_path, monkeypatch, postgres_uri):
    """Queue workers log the same corpus at the same moment: MLflow's look-up-then-insert of
    the dataset row races, and the loser's insert breaks the unique key. Every run must still
    end up linked to the one dataset (CI met this as a failed queue task). On PostgreSQL, whose
    transactions really run side by side."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    workers, rounds = 4, 5
    with mlflow_server(postgres_uri, tmp_path, dict(os.environ)) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        # A stuck request fails the test in minutes instead of MLflow's long retries.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        # As a stage does: MLflow keeps the URI of the last use_store in this process otherwise.
        assert store.use_store() == url
        client = MlflowClient(tracking_uri=url)
        experiment_id = client.create_experiment("datasets")
        source = HTTPDatasetSource("http://127.0.0.1/corpus.txt")
        for round_number in range(rounds):
            # A new digest each round, so every round starts with no row to find.
            dataset = MetaDataset(source, name="corpus", digest=f"digest-{round_number}")
            run_ids = [client.create_run(experiment_id).info.run_id for _ in range(workers)]
            start = threading.Barrier(workers, timeout=120)

            def link(run_id: str, dataset=dataset, start=start) -> None:
                start.wait()
                lineage.log_datasets(run_id, {"training": dataset})

            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(link, run_ids))
            for run_id in run_ids:
                inputs = client.get_run(run_id).inputs.dataset_inputs
                assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [
                    ("corpus", f"digest-{round_number}")
                ]
                assert [(t.key, t.value) for t in inputs[0].tags] == [
                    ("mlflow.data.context", "training")
                ]


# Database stores that cannot serve ---------------------------------------------------------

DATABASE_PASSWORD = "right-pw"


@pytest.fixture(scope="module")
def postgres_with_password() -> Iterator[str]:
    with postgres_cluster(password=DATABASE_PASSWORD) as uri:
        yield uri


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("fault", ["wrong password", "closed port", "silent port"])
def test_a_database_store_that_cannot_be_used_is_named_within_seconds(
    postgres_with_password, monkeypatch, fault
):
    """Before, MLflow retried for 90 s and more, logging nine warnings of several lines."""
    right = postgres_with_password
    with contextlib.ExitStack() as stack:
        if fault == "wrong password":
            uri, expected = right.replace(DATABASE_PASSWORD, "wrong-pw"), "password authentication"
        elif fault == "closed port":
            uri, expected = f"postgresql://bob:pw@127.0.0.1:{free_port()}/mlflow", "refused"
        else:
            port = stack.enter_context(silent_port())
            uri, expected = f"postgresql://bob:pw@127.0.0.1:{port}/mlflow", "timeout"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(PipelineError) as failure:
            store.connect("bigram")
        elapsed = time.monotonic() - started

    assert elapsed < 15, f"{elapsed:.0f} s"
    message = str(failure.value)
    assert "\n" not in message and expected in message, message
    assert message.startswith(f"MLflow store {masked(uri)} cannot be reached")
    assert "wrong-pw" not in message and ":pw@" not in message


def test_a_new_experiment_of_a_database_store_keeps_its_artifacts_in_the_repository(
    postgres_uri, monkeypatch, tmp_path
):
    """`dvc exp run --temp` runs the stage in a temporary copy of the repo, which DVC deletes;
    DVC_ROOT names the repository."""
    repo, workspace = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1234"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_uri)

    experiment_id = store.connect("made-in-a-temporary-copy")

    # Before, MLflow's default: ./mlruns of the working directory, deleted with it.
    location = MlflowClient(tracking_uri=postgres_uri).get_experiment(experiment_id)
    assert location.artifact_location == (repo / "mlartifacts").as_uri()
