"""Bad params fail before any work, naming the param and its allowed range."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.lm.lecture import lecture_train_params
from pipeline.lm.training import resolve_device
from pipeline.params import check_block_size, load_params
from testbed import (
    assert_one_line_error,
    run,
    run_stage,
    run_statuses,
    update_params,
    write_committed_params,
)
from tests.support.params import load_error, write_params


def test_the_repo_params_are_valid(tmp_path):
    params = load_params(write_committed_params(tmp_path))
    assert params.train.lr == 0.01 and params.train.batch_size == 32
    assert params.sample.num_chars <= params.sample.max_chars
    assert params.data.name == "shakespeare" and params.data.max_vocab_size == 4096
    assert params.tracking.registered_model_name == "bigram-shakespeare"


def test_the_committed_train_params_are_the_lectures(tmp_path):
    """params.yaml is where the pipeline's values are set; the benchmarks' reference runs the
    lecture's. They agree, so that the pipeline's default run is the lecture's."""
    assert load_params(write_committed_params(tmp_path)).train == lecture_train_params()


def test_the_registered_model_is_named_after_the_corpus_unless_named_itself(tmp_path):
    params = load_params(write_params(tmp_path, **{"data.name": "lunyu"}))
    assert params.tracking.registered_model_name == "bigram-lunyu"
    assert params.flat()["tracking.registered_model_name"] == "bigram-lunyu"
    named = {"data.name": "lunyu", "tracking.registered_model_name": "analects"}
    assert load_params(write_params(tmp_path, **named)).tracking.registered_model_name == "analects"


def test_an_integer_where_a_number_is_needed_is_a_float(tmp_path):
    params = load_params(write_params(tmp_path, **{"train.lr": 1, "sample.temperature": 2}))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.sample.temperature == 2.0


BAD_VALUES = [
    # (param, value, words the message must hold besides the param's name)
    ("train.lr", 0, "> 0, got 0.0"),
    ("train.lr", -0.1, "> 0, got -0.1"),
    ("train.lr", float("nan"), "a finite number > 0"),
    ("train.lr", float("inf"), "a finite number > 0"),
    ("train.lr", "abc", "must be a number, got 'abc'"),
    ("train.batch_size", 0, "a positive integer, got 0"),
    ("train.batch_size", -4, "a positive integer, got -4"),
    ("train.batch_size", 3.5, "must be an integer, got 3.5"),
    ("train.batch_size", "abc", "must be an integer, got 'abc'"),
    ("train.batch_size", True, "must be an integer, got True"),
    ("train.block_size", 0, "a positive integer, got 0"),
    ("train.block_size", 8.0, "must be an integer, got 8.0"),
    ("train.max_iters", 0, "a positive integer, got 0"),
    ("train.max_iters", "300", "must be an integer, got '300'"),
    ("train.eval_interval", -1, "a positive integer, got -1"),
    ("train.seed", -1, "an integer in [0, 2**63)"),
    ("train.device", "gpu", "one of ('auto', 'cpu', 'cuda', 'mps'), got 'gpu'"),
    ("train.method", "sgd", "one of ('minibatch', 'counts')"),
    ("data.train_fraction", 0, "in (0, 1), got 0.0"),
    ("data.train_fraction", 1, "in (0, 1), got 1.0"),
    ("data.train_fraction", 1.5, "in (0, 1), got 1.5"),
    ("data.sha256", "abc", "a 64-digit hex sha256"),
    ("data.name", "", "a short name of letters, digits, '.', '_' or '-', got ''"),
    ("data.name", "my text", "a short name of letters, digits, '.', '_' or '-', got 'my text'"),
    ("data.name", "a/b", "got 'a/b'"),
    ("data.max_vocab_size", 1, "an integer >= 2, got 1"),
    ("data.max_vocab_size", 1e5, "must be an integer, got 100000.0"),
    ("sample.num_chars", 0, "a positive integer, got 0"),
    ("sample.num_chars", 2.5, "must be an integer, got 2.5"),
    ("sample.num_chars", 2_000_000, "at most sample.max_chars = 1000000, got 2000000"),
    ("sample.max_chars", 0, "a positive integer, got 0"),
    ("sample.temperature", 0, "> 0, got 0.0"),
    ("sample.temperature", "hot", "must be a number, got 'hot'"),
    # MLflow's SQL stores hold names of 256 characters at most (PostgreSQL refuses longer ones
    # only when the registration writes them, after the whole training).
    ("tracking.registered_model_name", "m" * 257, "at most 256 characters"),
    ("tracking.experiment_name", "e" * 257, "at most 256 characters"),
    ("data.name", "n" * 250, "at most 249 characters (the registered model's name"),
]


@pytest.mark.parametrize(("param", "value", "rule"), BAD_VALUES)
def test_a_bad_value_names_the_param_and_its_range(tmp_path, param, value, rule):
    message = load_error(write_params(tmp_path, **{param: value}))
    assert f"param '{param}'" in message and rule in message, message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.lrr": 0.1}, "unknown param 'train.lrr'; did you mean 'train.lr'?"),
        ({"sample.temprature": 0.8}, "did you mean 'sample.temperature'?"),
        ({"traing": {"lr": 0.1}}, "unknown param 'traing'; did you mean 'train'?"),
        ({"train.zzz": 1}, "unknown param 'train.zzz'; known: method, batch_size"),
    ],
)
def test_an_unknown_key_suggests_the_close_match(tmp_path, overrides, expected):
    assert expected in load_error(write_params(tmp_path, **overrides))


def test_a_missing_required_param_is_named(tmp_path):
    path = write_params(tmp_path, data={"sha256": "0" * 64})
    assert "param 'data.url' is required" in load_error(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: [1, 2\n", "not valid YAML at line 3, column 1: expected ',' or ']'"),
        (
            "train:\n  lr: 1\n  lr: 2\n",
            'not valid YAML at line 3, column 3: found duplicate key "lr"',
        ),
        ("- 1\n- 2\n", "must be a mapping of sections"),
    ],
)
def test_a_params_file_that_is_not_a_mapping_is_rejected(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert expected in load_error(path)


def test_block_size_must_be_shorter_than_the_smaller_split():
    check_block_size(8, 100, 9)
    with pytest.raises(
        PipelineError,
        match=r"'train.block_size' must be shorter than the smaller "
        r"split \(8 tokens\), got 8",
    ):
        check_block_size(8, 100, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_an_error_not_a_fall_back():
    with pytest.raises(
        PipelineError, match="'train.device' is 'cuda' but this machine has no CUDA"
    ):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_mps_without_an_mps_device_is_an_error():
    with pytest.raises(PipelineError, match="'train.device' is 'mps' but this machine has no MPS"):
        resolve_device("mps")


def test_a_stage_with_a_bad_param_stops_before_any_work(prepared_copy):
    repo, env = prepared_copy
    corpus = repo / "data/raw/input.txt"
    corpus_mtime = corpus.stat().st_mtime_ns
    runs_before = run_statuses(repo)
    update_params(repo, train={"batch_size": 3.5})

    result = run_stage("download", repo, env)

    assert_one_line_error(
        result, "params.yaml: param 'train.batch_size' must be an integer, got 3.5"
    )
    assert corpus.stat().st_mtime_ns == corpus_mtime
    assert run_statuses(repo) == runs_before, "no MLflow run may start before params are valid"


@pytest.mark.e2e
def test_dvc_exp_run_set_param_typo_is_rejected(prepared_copy):
    repo, env = prepared_copy
    params_before = (repo / "params.yaml").read_text()

    # DVC refuses to set a key that params.yaml lacks, before running anything.
    refused = run(["dvc", "exp", "run", "-S", "train.lrr=0.1"], repo, env, check=False)
    assert refused.returncode != 0
    assert "train.lrr" in refused.stderr and "Traceback" not in refused.stderr
    assert (repo / "params.yaml").read_text() == params_before

    # Forced in with `+`, the key reaches the stages, which reject it with the close match.
    forced = run(["dvc", "exp", "run", "-S", "+train.lrr=0.1"], repo, env, check=False)
    assert forced.returncode != 0 and "Traceback" not in forced.stderr
    assert "error: params.yaml: unknown param 'train.lrr'; did you mean 'train.lr'?" in (
        forced.stderr
    )


@pytest.mark.e2e
def test_dvc_exp_run_set_param_of_the_wrong_type_is_rejected(prepared_copy):
    repo, env = prepared_copy
    result = run(["dvc", "exp", "run", "-S", "train.batch_size=abc"], repo, env, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: params.yaml: param 'train.batch_size' must be an integer, got 'abc'" in (
        result.stderr
    )
    assert all(status != "RUNNING" for status in run_statuses(repo).values())
