"""Every number a user gives has a checked type and range before any work: params, the generate
command's flags, the fields of a request to the served model, and the size of a download.

Requests go over real HTTP to a real `mlflow models serve`; the command runs as its own process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from pipeline import generate
from pipeline.errors import PipelineError
from pipeline.lm import sampling
from pipeline.lm.bigram import BigramLanguageModel
from pipeline.lm.sampling import TextGenerator
from pipeline.params import MIN_TEMPERATURE, load_params
from pipeline.stages.download import MAX_BYTES_ENV, bytes_from_env, download_verified
from pipeline.tracking import store
from testbed import (
    CORPUS_SHA256,
    REPO_ROOT,
    VENV_BIN,
    assert_one_line_error,
    background,
    files_in,
    free_port,
    run_stage,
    run_statuses,
    update_params,
    write_committed_params,
)
from tests.support.models import CHARS, log_generator, model_temp_dirs
from tests.support.params import load_error, write_params
from tests.support.servers import request_json

# Params ------------------------------------------------------------------------------------

OUT_OF_BOUNDS = [
    ("train.batch_size", 100_000_000_000, "at most 16,777,216 tokens per batch"),
    ("train.max_iters", 99999999999999999999999, "at most 1,000,000,000"),
    ("train.eval_interval", 1, None),  # with max_iters 10**9, below
    ("sample.max_chars", 10**12, "at most 10,000,000"),
    ("sample.temperature", 1e-39, "at least 0.001"),
    ("tracking.registered_model_name", "my/model", "no '/' or ':'"),
    ("tracking.registered_model_name", "a:b", "no '/' or ':'"),
    ("tracking.registered_model_name", "..", "not '.' or '..'"),
    ("tracking.registered_model_name", " ", "non-empty"),
]


@pytest.mark.parametrize(("param", "value", "rule"), OUT_OF_BOUNDS)
def test_a_value_out_of_bounds_names_the_param_and_the_bound(tmp_path, param, value, rule):
    overrides = {param: value}
    if param == "train.eval_interval":
        overrides["train.max_iters"] = 10**9
        rule = "at least train.max_iters / 100,000"
    message = load_error(write_params(tmp_path, **overrides))
    assert f"param '{param}'" in message and rule in message, message


def test_a_batch_too_large_for_memory_stops_before_any_work(prepared_copy):
    repo, env = prepared_copy
    previous = repo / "data/train/model.pt"
    previous.parent.mkdir(exist_ok=True)  # git holds data/train/loss_curve.csv
    previous.write_bytes(b"the previous model")
    update_params(repo, train={"batch_size": 100_000_000_000})
    runs_before = run_statuses(repo)

    result = run_stage("train", repo, env)

    assert_one_line_error(result, "param 'train.batch_size' must be at most 16,777,216 tokens")
    assert previous.read_bytes() == b"the previous model"
    assert run_statuses(repo) == runs_before


def test_the_lowest_temperature_still_gives_finite_probabilities(tmp_path):
    torch.manual_seed(0)
    model = BigramLanguageModel(len(CHARS))
    with torch.no_grad():
        model.token_embedding_table.weight.mul_(30)  # far sharper than any trained model
    probs = model.next_token_probs(MIN_TEMPERATURE)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(dim=1), torch.ones(len(CHARS)))
    sample = load_params(write_committed_params(tmp_path)).sample
    greedy = TextGenerator(model, CHARS, sample).generate("A", 50, MIN_TEMPERATURE, seed=1)
    assert len(greedy) == 51 and set(greedy) <= set(CHARS)
    assert not torch.isfinite(model.next_token_probs(1e-39)).all(), "why the bound exists"


# The generate command ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--seed", "18446744073709551616"], "seed must be an integer in [0, 2**63)"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**63)"),
        (["--temperature", "1e-39"], "temperature must be a finite number of at least 0.001"),
        (["--temperature", "nan"], "got nan"),
        (["--temperature", "inf"], "got inf"),
        (["--chars", "1.5"], "argument --chars: invalid int value: '1.5'"),
        (["--chars", "-1"], "chars must be 0 or more, got -1"),
        (["--chars", str(10**30)], "characters requested, above the limit sample.max_chars"),
        (["--model", "s3://bucket/model"], "'s3:' is not a model URI of this project"),
        (["--model", "http://127.0.0.1:1/model"], "'http:' is not a model URI of this project"),
        (["--vocab", "params.yaml"], "params.yaml is not valid JSON"),
        (["--vocab", "data/vocab.json"], "data/vocab.json is not a vocabulary"),
    ],
)
def test_a_bad_flag_of_the_generate_command_is_one_line(workspace, flags, expected):  # noqa: F811
    (workspace / "data/vocab.json").write_text('{"chars": ["a", "b", "a"]}')
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.generate", *flags],
        cwd=workspace,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(workspace)},
        timeout=120,
    )
    assert_one_line_error(result, expected)
    assert result.stdout == ""


def test_model_loads_remove_their_temporary_directory(workspace, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(tempfile, "tempdir", str(workspace / "tmp"))
    (workspace / "tmp").mkdir()
    run_id = log_generator(workspace)

    generate.main(["--model", f"runs:/{run_id}/generator", "--chars", "20"])
    assert capsys.readouterr().out.strip()
    assert model_temp_dirs() == []

    with pytest.raises(PipelineError, match="runs:/nope/generator"):
        generate.main(["--model", "runs:/nope/generator"])
    assert model_temp_dirs() == []

    for mlmodel in workspace.glob("mlartifacts/**/MLmodel"):
        mlmodel.write_text("flavors: [not: a mapping")
    with pytest.raises(PipelineError, match="is not a loadable MLflow model"):
        generate.main(["--model", f"runs:/{run_id}/generator"])
    assert model_temp_dirs() == []


# The served model --------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_served_model_checks_every_field_and_bounds_the_whole_request(
    workspace,  # noqa: F811
    tmp_path,
):
    """Real HTTP requests to `mlflow models serve`: bad values are HTTP 400 naming the field,
    and sample.max_chars (500 in the workspace) bounds all rows of a request together."""
    run_id = log_generator(workspace)
    port = free_port()
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(workspace),
        "MLFLOW_TRACKING_URI": store.tracking_uri(),
    }
    serve = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"runs:/{run_id}/generator"]
    serve += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with background(serve, f"http://127.0.0.1:{port}/ping", workspace / "serve.log", env):
        url = f"http://127.0.0.1:{port}/invocations"

        def post(*records: dict) -> tuple[int, str]:
            return request_json(url, {"dataframe_records": list(records)})

        status, body = post({"prompt": "A", "chars": 20}, {"prompt": "B"})
        assert status == 200, body
        texts = json.loads(body)["predictions"]
        assert [len(text) for text in texts] == [21, 101]

        bad = [
            ({"prompt": None}, "prompt must be a string, got None"),
            ({"prompt": 5}, "prompt must be a string, got 5"),
            ({"prompt": "A", "chars": 1.5}, "chars must be an integer, got 1.5"),
            ({"prompt": "A", "chars": 1e30}, "characters requested, above the limit"),
            ({"prompt": "A", "chars": True}, "chars must be an integer, got True"),
            ({"prompt": "A", "chars": "7"}, "chars must be an integer, got '7'"),
            ({"prompt": "A", "temperature": math.nan}, "got nan"),
            ({"prompt": "A", "temperature": 1e-39}, "at least 0.001, got 1e-39"),
            ({"prompt": "A", "seed": 2**64}, "seed must be an integer in [0, 2**63)"),
        ]
        for record, expected in bad:
            status, body = post(record)
            assert status == 400 and expected in json.loads(body)["message"], (record, body)

        started = time.perf_counter()
        status, body = post(*[{"prompt": "A", "chars": 500}] * 60)
        refused_in_s = time.perf_counter() - started
        assert status == 400, body
        assert "30,000 characters requested in 60 rows" in json.loads(body)["message"]
        assert refused_in_s < 5, "refused before generating anything"
        status, body = post(*[{"prompt": "A", "chars": 100}] * 5)
        assert status == 200 and len(json.loads(body)["predictions"]) == 5

        # Rows are bounded too (pipeline.lm.sampling.MAX_REQUEST_ROWS): refused before any is read.
        started = time.perf_counter()
        status, body = post(*[{"prompt": "A", "chars": 0}] * (sampling.MAX_REQUEST_ROWS + 1))
        assert (
            status == 400 and "pipeline.lm.sampling.MAX_REQUEST_ROWS" in json.loads(body)["message"]
        )
        assert time.perf_counter() - started < 5


# The download ------------------------------------------------------------------------------


def test_a_source_that_never_ends_stops_at_the_size_cap(tmp_path, faulty_server):  # noqa: F811
    output = tmp_path / "input.txt"
    url = f"{faulty_server.url}/endless"
    with pytest.raises(PipelineError) as raised:
        download_verified(url, CORPUS_SHA256, output, max_bytes=3 << 20)
    assert f"corpus source {url} is larger than {MAX_BYTES_ENV} = 3,145,728 bytes" in str(
        raised.value
    )
    assert files_in(tmp_path) == []


def test_an_announced_size_above_the_cap_is_refused_before_the_transfer(corpus_url, tmp_path):
    with pytest.raises(PipelineError, match="is larger than BIGRAM_DOWNLOAD_MAX_BYTES = 1,000"):
        download_verified(corpus_url, CORPUS_SHA256, tmp_path / "input.txt", max_bytes=1000)
    assert files_in(tmp_path) == []


def test_the_download_stage_stops_an_endless_source_with_one_line(
    prepared_copy,
    faulty_server,  # noqa: F811
):
    repo, env = prepared_copy
    before = (repo / "data/raw/input.txt").read_bytes()
    url = f"{faulty_server.url}/endless"
    env.update(BIGRAM_CORPUS_URL=url, BIGRAM_DOWNLOAD_MAX_BYTES="5000000")

    result = run_stage("download", repo, env)

    assert_one_line_error(result, f"{url} is larger than BIGRAM_DOWNLOAD_MAX_BYTES")
    assert (repo / "data/raw/input.txt").read_bytes() == before
    assert files_in(repo / "data/raw") == ["download.json", "input.txt"]


@pytest.mark.parametrize("value", ["0", "-1", "1e9", "lots", "1.5"])
def test_the_size_cap_must_be_a_whole_number_of_bytes(monkeypatch, value):
    monkeypatch.setenv(MAX_BYTES_ENV, value)
    with pytest.raises(PipelineError, match=f"{MAX_BYTES_ENV} must be a whole number of bytes"):
        bytes_from_env(MAX_BYTES_ENV, 1 << 30)
    monkeypatch.setenv(MAX_BYTES_ENV, "2048")
    assert bytes_from_env(MAX_BYTES_ENV, 1 << 30) == 2048
