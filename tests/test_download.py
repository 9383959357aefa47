"""Download faults: unreachable sources, HTTP errors, bad checksums, killed transfers, sources
that would wait without end (a FIFO, a device, a server that drips), loops (of symlinks, of
redirects) and redirects that would carry a password to another origin.

Real HTTP servers and sockets on 127.0.0.1 play the faulty source; the download code is the
stage's own, called directly where only its result matters and as the stage process where the
exit status, stderr, files and MLflow runs do too.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.secrets import basic_auth_header
from pipeline.stages.download import (
    BACKOFF_ENV,
    DEADLINE_ENV,
    MAX_BYTES_ENV,
    TIMEOUT_ENV,
    download_verified,
    open_with_retries,
    retry_delays,
    settings_from_env,
)
from pipeline.tracking import store
from testbed import (
    CORPUS_SHA256,
    assert_one_line_error,
    files_in,
    free_port,
    mlflow_runs,
    run_stage,
    run_statuses,
    update_params,
)
from tests.support.servers import SENT_BEFORE_STALL, WRONG_BODY, start_faulty_server

FAST_RETRIES = (0.01, 0.01, 0.01)


@pytest.fixture
def faulty_server(shakespeare_corpus) -> Iterator[http.server.ThreadingHTTPServer]:
    with start_faulty_server(shakespeare_corpus.read_bytes()) as server:
        yield server


@pytest.fixture
def other_server(shakespeare_corpus) -> Iterator[http.server.ThreadingHTTPServer]:
    """A second server, on another port: another origin, where a redirect may lead."""
    with start_faulty_server(shakespeare_corpus.read_bytes()) as server:
        yield server


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


@pytest.mark.parametrize("source", ["{tmp}/missing.txt", "file://{tmp}/missing.txt"])
def test_a_missing_local_source_is_named_without_retries(tmp_path, source):
    source = source.format(tmp=tmp_path)
    message = open_error(source)
    assert f"corpus source {source} cannot be read" in message and "BIGRAM_CORPUS_URL" in message


def error_within(seconds: float, function, *args) -> str:
    """The PipelineError function(*args) raises, which must come within seconds (in a thread,
    so that a call that blocks fails the test instead of hanging it)."""
    outcome: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: outcome.append(raised_by(function, *args)))
    thread.daemon = True
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} still waits after {seconds} s"
    assert isinstance(outcome[0], PipelineError), outcome[0]
    return str(outcome[0])


def raised_by(function, *args) -> BaseException | None:
    try:
        function(*args)
    except BaseException as error:
        return error
    return None


@contextlib.contextmanager
def not_a_regular_file(kind: str, tmp_path: Path) -> Iterator[str]:
    """A real FIFO, device, directory or socket to give as the corpus."""
    if kind == "character device":
        yield "/dev/zero"  # never ends
        return
    path = tmp_path / kind.replace(" ", "-")
    if kind == "directory":
        path.mkdir()
        yield str(path)
        return
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            yield str(path)
        return
    os.mkfifo(path)
    try:
        yield str(path)
    finally:
        # Were a reader blocked in open(), a writer that comes and goes releases it.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("kind", ["FIFO", "character device", "directory", "socket"])
@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_local_source_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind, as_url):
    with not_a_regular_file(kind, tmp_path) as path:
        source = Path(path).as_uri() if as_url else path
        message = error_within(5, open_with_retries, source, 5.0, FAST_RETRIES)
    assert f"corpus source {source} is a {kind}" in message, message
    assert "not a regular file" in message and "BIGRAM_CORPUS_URL" in message


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_symlink_loop_is_named_as_such_not_as_unreachable(tmp_path, as_url):
    (tmp_path / "a.txt").symlink_to(tmp_path / "b.txt")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    source = (tmp_path / "a.txt").as_uri() if as_url else str(tmp_path / "a.txt")
    message = open_error(source)
    assert f"corpus source {source} is a symlink loop" in message, message
    assert "unreachable" not in message and "offline" not in message


def test_a_redirect_loop_is_one_line_naming_the_url(faulty_server):
    url = f"{faulty_server.url}/loop"
    message = open_error(url)
    assert f"corpus source {url} redirects in a loop (HTTP 302" in message
    assert "\n" not in message and "BIGRAM_CORPUS_URL" in message


PASSWORD = "pw-never-elsewhere"


def authorizations(server) -> list[str | None]:
    """The Authorization header of each request the server got (None where it had none)."""
    return [headers.get("Authorization") for _, headers in server.seen]


@pytest.mark.parametrize(
    "target",
    ["{other}/input.txt", "http://localhost:{port}/input.txt"],
    ids=["another-port", "another-host"],
)
def test_credentials_do_not_follow_a_redirect_to_another_origin(
    faulty_server, other_server, tmp_path, target
):
    """A mirror with a password answers 302 to another origin, which must not get it.

    urllib's redirect handler copies every header to the new URL, Authorization included."""
    destination = other_server if target.startswith("{other}") else faulty_server
    target = target.format(other=other_server.url, port=faulty_server.server_address[1])
    host = faulty_server.url.removeprefix("http://")
    source = f"http://reader:{PASSWORD}@{host}/redirect?{urllib.parse.urlencode({'to': target})}"

    size = download_verified(source, CORPUS_SHA256, tmp_path / "input.txt", timeout_s=5)

    assert size == 1_115_394, "the redirect itself is followed"
    sent = basic_auth_header("reader", PASSWORD)["Authorization"]
    assert faulty_server.seen[0][1].get("Authorization") == sent, "the origin named gets it"
    landed = [headers for path, headers in destination.seen if path == "/input.txt"]
    assert len(landed) == 1 and "Authorization" not in landed[0], landed


def test_credentials_follow_a_redirect_within_their_origin(faulty_server, tmp_path):
    host = faulty_server.url.removeprefix("http://")
    source = f"http://reader:{PASSWORD}@{host}/redirect?to=/input.txt"
    download_verified(source, CORPUS_SHA256, tmp_path / "input.txt", timeout_s=5)
    sent = basic_auth_header("reader", PASSWORD)["Authorization"]
    assert authorizations(faulty_server) == [sent, sent]


def test_the_tracking_server_probe_keeps_credentials_at_their_origin(
    faulty_server, other_server, monkeypatch
):
    """The tracking server answers the probe with 302 to another server, which must not get them."""
    monkeypatch.setenv(store.USERNAME_ENV, "reader")
    monkeypatch.setenv(store.PASSWORD_ENV, PASSWORD)
    target = urllib.parse.urlencode({"to": f"{other_server.url}/health"})
    # The probe appends its API path to the URI: this query takes that suffix as a field.
    store._probe_server(f"{faulty_server.url}/redirect?{target}&path=")
    sent = basic_auth_header("reader", PASSWORD)["Authorization"]
    assert authorizations(faulty_server) == [sent]
    assert authorizations(other_server) == [None]


@pytest.mark.parametrize("what", ["drip", "drip-headers"])
def test_a_source_that_drips_stops_at_the_deadline_of_the_whole_download(
    faulty_server, tmp_path, what
):
    """A byte every 50 ms never trips the time-out of one read (5 s): the deadline does."""
    output = tmp_path / "raw/input.txt"
    started = time.monotonic()
    with pytest.raises(PipelineError) as raised:
        download_verified(
            f"{faulty_server.url}/{what}", CORPUS_SHA256, output, timeout_s=5, deadline_s=0.5
        )
    assert time.monotonic() - started < 3
    assert f"did not finish within {DEADLINE_ENV} = 0.5 s" in str(raised.value)
    assert files_in(output.parent) == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (TIMEOUT_ENV, "abc"),
        (TIMEOUT_ENV, "0"),
        (TIMEOUT_ENV, "-1"),
        (TIMEOUT_ENV, "nan"),
        (TIMEOUT_ENV, "1e308"),  # was an OverflowError from the socket
        (TIMEOUT_ENV, "3601"),
        (BACKOFF_ENV, "1000000000"),  # was a billion seconds of sleep
        (BACKOFF_ENV, "inf"),
        (DEADLINE_ENV, "86401"),
        (DEADLINE_ENV, "0"),
    ],
)
def test_network_settings_must_be_seconds_in_their_range(monkeypatch, name, text):
    monkeypatch.setenv(name, text)
    with pytest.raises(PipelineError, match=f"{name} must be a number of seconds > 0 and <= "):
        settings_from_env()


@pytest.mark.parametrize("text", ["9" * 5000, str((1 << 40) + 1)])
def test_the_size_cap_has_an_upper_bound(monkeypatch, text):
    monkeypatch.setenv(MAX_BYTES_ENV, text)
    with pytest.raises(PipelineError, match=f"{MAX_BYTES_ENV} must be a whole number of bytes"):
        settings_from_env()


def test_network_settings_default_and_override(monkeypatch):
    for name in (TIMEOUT_ENV, BACKOFF_ENV, DEADLINE_ENV, MAX_BYTES_ENV):
        monkeypatch.delenv(name, raising=False)
    defaults = settings_from_env()
    assert (defaults.timeout_s, defaults.retry_delays_s) == (30.0, (1.0, 2.0, 4.0))
    assert (defaults.deadline_s, defaults.max_bytes) == (600.0, 1 << 30)
    monkeypatch.setenv(BACKOFF_ENV, "60")
    monkeypatch.setenv(TIMEOUT_ENV, "3600")
    monkeypatch.setenv(DEADLINE_ENV, "0.25")
    settings = settings_from_env()
    assert settings.retry_delays_s == (60.0, 120.0, 240.0) and settings.timeout_s == 3600
    assert settings.deadline_s == 0.25


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
        [sys.executable, "-m", "pipeline.stages.download"],
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


def test_the_download_stage_stops_a_dripping_source_at_its_deadline(download_repo, faulty_server):
    repo, env = download_repo
    env.update({"BIGRAM_CORPUS_URL": f"{faulty_server.url}/drip", DEADLINE_ENV: "1"})

    result = run_stage("download", repo, env, timeout=60)

    assert_one_line_error(result, f"did not finish within {DEADLINE_ENV} = 1 s", "/drip")
    assert files_in(repo / "data/raw") == []
    assert newest_run(repo).info.status == "FAILED"


def test_the_download_stage_refuses_a_fifo_at_once(download_repo, tmp_path):
    repo, env = download_repo
    with not_a_regular_file("FIFO", tmp_path) as fifo:
        env["BIGRAM_CORPUS_URL"] = fifo
        # Before, open() waited for a writer for ever: run_stage's time-out fails the test.
        result = run_stage("download", repo, env, timeout=60)
    assert_one_line_error(result, f"corpus source {fifo} is a FIFO (named pipe)")
    assert files_in(repo / "data/raw") == []


def test_a_checksum_mismatch_says_that_the_mirror_variable_overrides_data_url(
    prepared_copy, tmp_path
):
    """Offline, BIGRAM_CORPUS_URL still exported (as the README says) wins over one's own text."""
    repo, env = prepared_copy
    own = tmp_path / "own.txt"
    own.write_text("My own text, not Shakespeare's.\n" * 100)
    update_params(
        repo, data={"url": str(own), "sha256": hashlib.sha256(own.read_bytes()).hexdigest()}
    )
    before = (repo / "data/raw/input.txt").read_bytes()
    assert env["BIGRAM_CORPUS_URL"]

    overridden = run_stage("download", repo, env)

    assert_one_line_error(
        overridden,
        f"has sha256 {CORPUS_SHA256}",
        f"BIGRAM_CORPUS_URL is set and overrides data.url ({own})",
        "`unset BIGRAM_CORPUS_URL`",
    )
    assert (repo / "data/raw/input.txt").read_bytes() == before
    del env["BIGRAM_CORPUS_URL"]
    unset = run_stage("download", repo, env)
    assert unset.returncode == 0, unset.stderr
    assert (repo / "data/raw/input.txt").read_bytes() == own.read_bytes()
