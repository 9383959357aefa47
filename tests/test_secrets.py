"""Credentials in URLs and URIs: used to connect, never shown or stored.

A corpus mirror that asks for a password is a real HTTP server on 127.0.0.1 checking basic
auth; the tracking server is MLflow's own basic-auth app (`mlflow server --app-name basic-auth`).
After runs that succeed and runs that fail, every file the stages could write to (outputs, the
MLflow store and artifacts, DVC's files) and everything they printed is searched for the password.
"""

from __future__ import annotations

import configparser
import secrets
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from pipeline.secrets import drops_credentials, masked, split_credentials
from testbed import (
    VENV_BIN,
    assert_one_line_error,
    background,
    free_port,
    mlflow_runs,
    pipeline_env,
    run_stage,
    run_statuses,
)
from tests.support.faults import basic_auth_server, files_holding

# Made up per test session, so that no file (this one in a repo copy included) holds it before.
PASSWORD = f"pw-{secrets.token_hex(12)}"


def test_masked_hides_the_password_of_every_url_in_a_text():
    text = (
        "error: http://ann:s3cr@t@host:8/x?a=b@c failed; postgresql+psycopg2://bob:pw@db/m, "
        "'https://carl:x%40y@h/p' and http://127.0.0.1:5000/?run=1 and sqlite:///m.db?timeout=60"
    )
    assert masked(text) == (
        "error: http://ann:***@host:8/x?a=b@c failed; postgresql+psycopg2://bob:***@db/m, "
        "'https://carl:***@h/p' and http://127.0.0.1:5000/?run=1 and sqlite:///m.db?timeout=60"
    )
    assert split_credentials("http://ann:s3cr%40t@host:8/x") == (
        "http://host:8/x",
        "ann",
        "s3cr@t",
    )
    assert split_credentials("http://host/x") == ("http://host/x", None, None)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A token alone as the user info (GitHub's form): the whole user info is the secret.
        ("https://ghp_T0KEN@github.com/u/r.git", "https://***@github.com/u/r.git"),
        ("http://dora@h/", "http://***@h/"),
        # A "/" in the password: SQLAlchemy reads it up to the "@", urlsplit would stop at "/".
        ("postgresql://bob:pa/ss@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow"),
        ("postgresql://bob:p?a#ss@db/mlflow", "postgresql://bob:***@db/mlflow"),
        # Secrets in the query or fragment, whatever the field's spelling.
        ("https://h/c.txt?access_token=T0KEN&x=1", "https://h/c.txt?access_token=***&x=1"),
        ("https://h/c.txt?token=T0KEN", "https://h/c.txt?token=***"),
        ("https://h/c.txt?user=me&password=T0KEN", "https://h/c.txt?user=me&password=***"),
        ("https://h/c.txt?secret=T0KEN", "https://h/c.txt?secret=***"),
        ("https://h/c.txt?key=T0KEN", "https://h/c.txt?key=***"),
        ("https://h/c.txt?api_key=T0KEN", "https://h/c.txt?api_key=***"),
        ("https://h/c?sv=2022&sig=T0KEN%3D&se=1", "https://h/c?sv=2022&sig=***&se=1"),
        (
            "https://b.s3.amazonaws.com/c?X-Amz-Credential=T0KEN%2F&X-Amz-Signature=T0KEN",
            "https://b.s3.amazonaws.com/c?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("https://h/cb#access_token=T0KEN&state=1", "https://h/cb#access_token=***&state=1"),
    ],
)
def test_masked_hides_every_secret_form_a_url_can_carry(url, shown):
    assert masked(url) == shown
    assert masked(f"error: cannot read '{url}'; retry") == f"error: cannot read '{shown}'; retry"
    assert masked(shown) == shown, "masking a masked text changes nothing"


def test_the_store_error_masks_a_password_holding_a_slash():
    uri = "postgresql://bob:pa/ss@db:5432/mlflow"
    assert "pa/ss" not in masked(uri) and "ss@" not in masked(uri)


@pytest.mark.parametrize(
    ("before", "after", "dropped"),
    [
        ("http://h:8/a", "http://h:8/b", False),
        ("http://h/a", "http://H:80/b", False),  # the same origin, spelt otherwise
        ("https://h/a", "https://h:443/b", False),
        ("http://h:8/a", "http://h:9/a", True),  # another port
        ("http://h/a", "http://other/a", True),  # another host
        ("https://h/a", "http://h:443/a", True),  # https to plain http
        ("http://h/a", "https://h/a", True),  # another scheme is another origin
        ("http://h:x/a", "http://h:x/b", True),  # an origin that cannot be read
    ],
)
def test_credentials_are_dropped_on_a_redirect_to_another_origin(before, after, dropped):
    assert drops_credentials(before, after) is dropped


def test_a_corpus_password_is_used_but_never_shown_or_stored(prepared_copy, shakespeare_corpus):
    repo, env = prepared_copy
    outputs = []
    with basic_auth_server(shakespeare_corpus.parent, "reader", PASSWORD) as server:
        env["BIGRAM_CORPUS_URL"] = f"http://reader:{PASSWORD}@{server.url[7:]}/input.txt"
        for stage in ("download", "vocab", "train"):
            result = run_stage(stage, repo, env, timeout=300)
            outputs.append(result.stdout + result.stderr)
            assert result.returncode == 0, result.stderr
        assert server.served == 1 and server.refused == 0

        env["BIGRAM_CORPUS_URL"] = f"http://reader:wrong-{PASSWORD}@{server.url[7:]}/input.txt"
        refused = run_stage("download", repo, env)
        outputs.append(refused.stdout + refused.stderr)
        assert_one_line_error(refused, "HTTP 401", f"http://reader:***@{server.url[7:]}")

    env["BIGRAM_CORPUS_URL"] = f"http://reader:{PASSWORD}@127.0.0.1:{free_port()}/input.txt"
    unreachable = run_stage("download", repo, env)
    outputs.append(unreachable.stdout + unreachable.stderr)
    assert_one_line_error(unreachable, "http://reader:***@127.0.0.1:", "is unreachable")

    env["MLFLOW_TRACKING_URI"] = f"http://reader:{PASSWORD}@127.0.0.1:{free_port()}/"
    no_server = run_stage("vocab", repo, env)
    outputs.append(no_server.stdout + no_server.stderr)
    assert_one_line_error(no_server, "MLflow tracking server http://127.0.0.1:", "unreachable")

    assert not [text for text in outputs if PASSWORD in text]
    assert files_holding(PASSWORD, repo) == []
    runs = mlflow_runs(repo)
    # The source a corpus came from is a tag of the download run (never of a DVC output).
    download = [r for r in runs if r.data.tags["stage"] == "download"][-1]
    assert download.data.tags["corpus_source"].startswith("http://reader:***@127.0.0.1:")
    assert "RUNNING" not in run_statuses(repo).values()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, corpus_url) -> Iterator[str]:
    """MLflow's basic-auth tracking server on 127.0.0.1, its admin's password PASSWORD."""
    workdir = tmp_path_factory.mktemp("auth-server")
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": f"sqlite:///{workdir / 'basic_auth.db'}",
        "admin_username": "admin",
        "admin_password": PASSWORD,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    with open(workdir / "basic_auth.ini", "w") as handle:
        config.write(handle)
    env = pipeline_env(
        corpus_url,
        MLFLOW_AUTH_CONFIG_PATH=str(workdir / "basic_auth.ini"),
        # The auth app's CSRF protection needs a key that stays the same while it runs.
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth"]
    cmd += ["--backend-store-uri", f"sqlite:///{workdir / 'server.db'}"]
    cmd += ["--artifacts-destination", str(workdir / "artifacts")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with background(cmd, f"{url}/health", workdir / "server.log", env):
        yield url
    assert PASSWORD not in (workdir / "server.log").read_text()


def server_runs(url: str, monkeypatch) -> list:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("bigram")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.e2e
def test_a_basic_auth_tracking_server_takes_the_password_in_the_uri_or_mlflows_variables(
    prepared_copy, auth_server, monkeypatch
):
    repo, env = prepared_copy
    host = auth_server.removeprefix("http://")
    outputs = []

    env["MLFLOW_TRACKING_URI"] = f"http://admin:{PASSWORD}@{host}"
    in_uri = run_stage("vocab", repo, env)
    outputs.append(in_uri.stdout + in_uri.stderr)
    assert in_uri.returncode == 0, in_uri.stderr

    env.update(
        MLFLOW_TRACKING_URI=auth_server,
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=PASSWORD,
    )
    in_variables = run_stage("vocab", repo, env)
    outputs.append(in_variables.stdout + in_variables.stderr)
    assert in_variables.returncode == 0, in_variables.stderr

    del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    env["MLFLOW_TRACKING_URI"] = f"http://admin:not-{PASSWORD}@{host}"
    refused = run_stage("vocab", repo, env)
    outputs.append(refused.stdout + refused.stderr)
    line = assert_one_line_error(refused, f"http://{host}")
    assert "401" in line or "nauthorized" in line or "credentials" in line.lower(), line

    runs = server_runs(auth_server, monkeypatch)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    for found in runs:
        logged = str(found.data.params) + str(found.data.tags) + found.info.artifact_uri
        assert PASSWORD not in logged
    assert not [text for text in outputs if PASSWORD in text]
    assert files_holding(PASSWORD, repo) == []
