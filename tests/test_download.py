"""Download faults: unreachable sources, HTTP errors, bad checksums and killed transfers.

Real HTTP servers and sockets on 127.0.0.1 play the faulty source; the download code is the
stage's own, called directly where only its result matters and as the stage process where the
exit status, stderr, files and MLflow runs do too.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.download import (
    BACKOFF_ENV,
    TIMEOUT_ENV,
    download_verified,
    open_with_retries,
    retry_delays,
    seconds_from_env,
)
from pipeline.errors import PipelineError
from testbed import (
    CORPUS_SHA256,
    assert_one_line_error,
    files_in,
    free_port,
    mlflow_runs,
    run_stage,
    run_statuses,
)

FAST_RETRIES = (0.01, 0.01, 0.01)
WRONG_BODY = b"To be, or not to be: that is not the corpus.\n"
SENT_BEFORE_STALL = 64 * 1024


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """/status/<code> answers that status; /wrong a short wrong corpus; /partial/<n> announces
    the whole corpus, sends n bytes and hangs up; /stall/<n> sends n bytes, then stalls."""

    def do_GET(self):
        server = self.server
        server.requests[self.path] += 1
        kind, _, arg = self.path.strip("/").partition("/")
        if kind == "status":
            self.send_error(int(arg))
            return
        body = WRONG_BODY if kind == "wrong" else server.corpus
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "wrong":
            self.wfile.write(body)
            return
        self.wfile.write(body[: int(arg)])
        self.wfile.flush()
        if kind == "stall":
            server.sent.set()
            server.release.wait(timeout=120)
        self.close_connection = True

    def log_message(self, format, *args):
        pass


@pytest.fixture
def faulty_server(shakespeare_corpus) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    server.daemon_threads = True
    server.corpus = shakespeare_corpus.read_bytes()
    server.requests = collections.Counter()
    server.sent, server.release = threading.Event(), threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog does) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/input.txt"


def open_error(url: str, timeout_s: float = 5.0) -> str:
    with pytest.raises(PipelineError) as raised:
        open_with_retries(url, timeout_s, FAST_RETRIES)
    return str(raised.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:{port}/input.txt", "Connection refused"),
        # RFC 6761: .invalid never resolves, so the lookup fails at once, online or not.
        ("http://corpus.invalid/input.txt", ""),
    ],
)
def test_an_unreachable_source_is_retried_then_named(url, reason):
    url = url.format(port=free_port())
    message = open_error(url)
    assert f"corpus source {url} is unreachable after 4 attempts" in message
    assert reason in message and "BIGRAM_CORPUS_URL" in message


def test_a_source_that_never_answers_times_out(silent_server):
    message = open_error(silent_server, timeout_s=0.2)
    assert f"{silent_server} is unreachable after 4 attempts (timed out)" in message
    assert "BIGRAM_CORPUS_URL" in message


def test_http_404_fails_at_once_with_the_status(faulty_server):
    url = f"{faulty_server.url}/status/404"
    assert f"corpus download from {url} failed with HTTP 404" in open_error(url)
    assert faulty_server.requests["/status/404"] == 1, "a 404 will not go away: no retry"


def test_http_500_is_retried_a_bounded_number_of_times(faulty_server):
    url = f"{faulty_server.url}/status/500"
    assert f"corpus download from {url} failed with HTTP 500" in open_error(url)
    assert faulty_server.requests["/status/500"] == 1 + len(FAST_RETRIES)


def test_retry_pauses_double():
    assert retry_delays(1.0) == (1.0, 2.0, 4.0)


@pytest.mark.parametrize("source", ["{tmp}/missing.txt", "file://{tmp}/missing.txt", "{tmp}"])
def test_a_missing_local_source_is_named_without_retries(tmp_path, source):
    source = source.format(tmp=tmp_path)
    message = open_error(source)
    assert f"corpus source {source} cannot be read" in message and "BIGRAM_CORPUS_URL" in message


@pytest.mark.parametrize("text", ["abc", "0", "-1", "nan"])
def test_network_settings_must_be_positive_seconds(monkeypatch, text):
    monkeypatch.setenv(TIMEOUT_ENV, text)
    with pytest.raises(PipelineError, match=f"{TIMEOUT_ENV} must be a number of seconds > 0"):
        seconds_from_env(TIMEOUT_ENV, 30.0)


def test_network_settings_default_and_override(monkeypatch):
    monkeypatch.delenv(BACKOFF_ENV, raising=False)
    assert seconds_from_env(BACKOFF_ENV, 1.0) == 1.0
    monkeypatch.setenv(BACKOFF_ENV, "0.25")
    assert seconds_from_env(BACKOFF_ENV, 1.0) == 0.25


def test_a_verified_download_leaves_no_temporary_file(corpus_url, tmp_path):
    output = tmp_path / "raw/input.txt"
    assert download_verified(corpus_url, CORPUS_SHA256, output) == 1_115_394
    assert hashlib.sha256(output.read_bytes()).hexdigest() == CORPUS_SHA256
    assert files_in(output.parent) == ["input.txt"]


def test_a_checksum_mismatch_shows_both_digests_and_writes_nothing(faulty_server, tmp_path):
    output = tmp_path / "raw/input.txt"
    with pytest.raises(PipelineError) as raised:
        download_verified(f"{faulty_server.url}/wrong", CORPUS_SHA256, output)
    actual = hashlib.sha256(WRONG_BODY).hexdigest()
    assert f"has sha256 {actual}, expected {CORPUS_SHA256}" in str(raised.value)
    assert files_in(output.parent) == []


def test_a_connection_closed_mid_transfer_writes_nothing(faulty_server, tmp_path):
    output = tmp_path / "raw/input.txt"
    with pytest.raises(PipelineError, match=r"broke off after 5,000 of 1,115,394 bytes"):
        download_verified(f"{faulty_server.url}/partial/5000", CORPUS_SHA256, output)
    assert files_in(output.parent) == []


def test_a_transfer_that_stalls_times_out_and_writes_nothing(faulty_server, tmp_path):
    output = tmp_path / "raw/input.txt"
    url = f"{faulty_server.url}/stall/{SENT_BEFORE_STALL}"
    with pytest.raises(PipelineError, match=r"broke off after 65,536 bytes \(timed out\)"):
        download_verified(url, CORPUS_SHA256, output, timeout_s=0.3, retry_delays_s=FAST_RETRIES)
    assert files_in(output.parent) == []


@pytest.fixture
def download_repo(prepared_copy) -> tuple[Path, dict[str, str]]:
    """A repo copy with an MLflow store but no download yet."""
    repo, env = prepared_copy
    for path in (repo / "data/raw").iterdir():
        path.unlink()
    env[BACKOFF_ENV] = "0.01"
    return repo, env


def newest_run(repo: Path):
    return mlflow_runs(repo)[-1]


def test_the_download_stage_fails_cleanly_on_an_unreachable_source(download_repo):
    repo, env = download_repo
    url = f"http://127.0.0.1:{free_port()}/input.txt"
    env["BIGRAM_CORPUS_URL"] = url

    result = run_stage("download", repo, env)

    assert_one_line_error(result, url, "unreachable after 4 attempts", "BIGRAM_CORPUS_URL")
    assert files_in(repo / "data/raw") == []
    failed = newest_run(repo)
    assert failed.data.tags["stage"] == "download" and failed.info.status == "FAILED"
    assert "RUNNING" not in run_statuses(repo).values()


def test_the_download_stage_fails_cleanly_on_a_checksum_mismatch(download_repo, faulty_server):
    repo, env = download_repo
    env["BIGRAM_CORPUS_URL"] = f"{faulty_server.url}/wrong"

    result = run_stage("download", repo, env)

    actual = hashlib.sha256(WRONG_BODY).hexdigest()
    assert_one_line_error(result, actual, CORPUS_SHA256, "data/raw/input.txt")
    assert files_in(repo / "data/raw") == []
    assert newest_run(repo).info.status == "FAILED"


def test_a_download_killed_mid_transfer_leaves_nothing_and_the_next_run_succeeds(
    download_repo, faulty_server, corpus_url
):
    repo, env = download_repo
    raw = repo / "data/raw"
    stalled = subprocess.Popen(
        [sys.executable, "-m", "pipeline.download"],
        cwd=repo,
        env={**env, "BIGRAM_CORPUS_URL": f"{faulty_server.url}/stall/{SENT_BEFORE_STALL}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stalled.kill)
        # The server has sent part of the corpus and stalls: the stage is mid-transfer, its
        # temporary file open beside the output.
        assert faulty_server.sent.wait(timeout=60), "the stage never requested the corpus"
        assert list(raw.glob(".input.txt.*.tmp")), "no temporary file for the transfer"
        stalled.send_signal(signal.SIGKILL)
        assert stalled.wait(timeout=30) == -signal.SIGKILL

    assert not (raw / "input.txt").exists(), "a killed download must not leave a partial corpus"
    killed_run = newest_run(repo)
    assert killed_run.info.status == "RUNNING", "SIGKILL gives the stage no chance to end it"

    result = run_stage("download", repo, {**env, "BIGRAM_CORPUS_URL": corpus_url})

    assert result.returncode == 0, result.stderr
    assert hashlib.sha256((raw / "input.txt").read_bytes()).hexdigest() == CORPUS_SHA256
    assert files_in(raw) == ["download.json", "input.txt"], "the stale temporary file is removed"
    statuses = run_statuses(repo)
    assert statuses[killed_run.info.run_id] == "KILLED", "the next stage ends the killed run"
    assert "RUNNING" not in statuses.values()
