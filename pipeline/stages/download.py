"""Stage 1, download: fetch the corpus, verify its sha256, write it atomically.

The source is params.yaml's ``data.url``, or ``$BIGRAM_CORPUS_URL`` (an http(s) URL, a file://
URL or a local path) on offline machines and mirrors, which overrides data.url; the checksum
applies either way. The corpus is streamed to a temporary file beside the output and renamed into
place only once verified, so the output path never holds a partial or unverified file. An
unreachable source is retried 3 times with doubling pauses. Every wait is bounded, each by an
environment knob with a checked range: ``$BIGRAM_DOWNLOAD_TIMEOUT_S`` (one connect or read,
default 30, at most 3600), ``$BIGRAM_DOWNLOAD_BACKOFF_S`` (the first pause, default 1, at most
60) and ``$BIGRAM_DOWNLOAD_DEADLINE_S`` (the whole download, every attempt included, default 600,
at most 86400), so a source that drips a byte a second cannot hold the stage. A source larger
than ``$BIGRAM_DOWNLOAD_MAX_BYTES`` (default 1 GiB, at most 1 TiB) is refused, so that a
misbehaving server that never ends cannot fill the disk. A local source must be a regular file:
a FIFO, a device or a socket is refused before it is opened. A user and password in an http(s)
URL are sent as basic auth, only to that URL's origin, and shown and stored as ``user:***``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import math
import os
import signal
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedIOBase
from pathlib import Path

import mlflow

from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json
from pipeline.params import CORPUS_URL_ENV, DataParams, load_params
from pipeline.paths import CORPUS_PATH, DOWNLOAD_INFO_PATH
from pipeline.secrets import basic_auth_header, masked, open_url, split_credentials
from pipeline.tracking import lineage, runs

CHUNK_BYTES = 1 << 20
# Network knobs, from the environment because they do not change the corpus (DVC ignores them):
# seconds to wait for one connect or read, the first pause before a retry (then doubled each
# time), seconds for the whole download, and the largest corpus taken. Each has an upper bound,
# so that a typo (1e308, a billion) is an error, not a wait without end or an OverflowError.
TIMEOUT_ENV = "BIGRAM_DOWNLOAD_TIMEOUT_S"
BACKOFF_ENV = "BIGRAM_DOWNLOAD_BACKOFF_S"
DEADLINE_ENV = "BIGRAM_DOWNLOAD_DEADLINE_S"
MAX_BYTES_ENV = "BIGRAM_DOWNLOAD_MAX_BYTES"
DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S = 30.0, 3600.0
DEFAULT_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0
# Enough for the default size cap, 1 GiB, at 1.8 MB/s; Tiny Shakespeare needs a second.
DEFAULT_DEADLINE_S, MAX_DEADLINE_S = 600.0, 86400.0
# Tiny Shakespeare is 1.1 MB; a corpus a thousand times larger still fits.
DEFAULT_MAX_BYTES, MAX_MAX_BYTES = 1 << 30, 1 << 40
RETRIES = 3
# Names of the kinds of files that are not a corpus, by the stat.S_IS* test that finds them.
NOT_REGULAR_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
CHECK_SOURCE = f"check data.url in params.yaml or {CORPUS_URL_ENV}"


def seconds_from_env(name: str, default: float, maximum: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= maximum):
        raise PipelineError(
            f"{name} must be a number of seconds > 0 and <= {maximum:g}, got {text!r}"
        )
    return seconds


def bytes_from_env(name: str, default: int, maximum: int = MAX_MAX_BYTES) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        # isdigit: no sign, space or "_"; int() refuses more than 4300 digits with ValueError.
        count = int(text) if text.isascii() and text.isdigit() else 0
    except ValueError:
        count = 0
    if not 0 < count <= maximum:
        raise PipelineError(
            f"{name} must be a whole number of bytes > 0 and <= {maximum:,}, got {text!r}"
        )
    return count


def retry_delays(backoff_s: float) -> tuple[float, ...]:
    return tuple(backoff_s * 2**attempt for attempt in range(RETRIES))


class DeadlinePassed(Exception):
    """The whole download took longer than its deadline (raised from the SIGALRM handler)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise DeadlinePassed in the block once seconds have passed, even inside a blocking call.

    A socket's time-out bounds one read, so a server that sends a byte just before each one
    expires would hold the transfer for ever; a real-time timer bounds all of it: connecting,
    headers, every byte, and the pauses between retries. Signals reach only the main thread; in
    another one, the block runs without this bound (read_chunk still checks between reads).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise DeadlinePassed

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def local_path(source: str) -> str | None:
    """The file a local source names (a path or a file:// URL); None for a network URL."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme != "file":
        return source
    if parts.netloc not in ("", "localhost"):
        raise PipelineError(
            f"corpus source {masked(source)} names a file on host {parts.netloc!r}: a file:// "
            f"URL must be local (file:///path/to/file); {CHECK_SOURCE}"
        )
    return urllib.request.url2pathname(parts.path)


def refuse_unless_regular(mode: int, shown_source: str) -> None:
    """Only a regular file is a corpus: a FIFO blocks its reader (open() itself waits for a
    writer), a device may never end (/dev/zero) or never answer."""
    for is_kind, kind in NOT_REGULAR_FILES:
        if is_kind(mode):
            raise PipelineError(
                f"corpus source {shown_source} is {kind}, not a regular file; {CHECK_SOURCE}"
            )


def local_error(error: OSError, shown_source: str) -> PipelineError:
    """A local source that cannot be opened: retrying will not help, nor will the network."""
    if error.errno == errno.ELOOP:
        return PipelineError(
            f"corpus source {shown_source} is a symlink loop (its links lead back to "
            f"themselves); fix the link, or {CHECK_SOURCE}"
        )
    return PipelineError(
        f"corpus source {shown_source} cannot be read ({error.strerror}); {CHECK_SOURCE}"
    )


def open_local_file(path: str, shown_source: str) -> BufferedIOBase:
    """Open a regular file for reading; anything else is refused before it is opened."""
    try:
        refuse_unless_regular(os.stat(path).st_mode, shown_source)
        # O_NONBLOCK: a FIFO swapped in after the stat must not block this open either.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise local_error(error, shown_source) from None
    try:
        refuse_unless_regular(os.fstat(fd).st_mode, shown_source)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_source(source: str, timeout_s: float) -> BufferedIOBase:
    """Open an http(s) URL, a file:// URL or a local path for streaming reads."""
    path = local_path(source)
    if path is not None:
        return open_local_file(path, masked(source))
    # urllib would take user:password@host for a host name.
    url, user, password = split_credentials(source)
    headers = basic_auth_header(user, password or "") if user is not None else {}
    return open_url(urllib.request.Request(url, headers=headers), timeout=timeout_s)


def http_error(error: urllib.error.HTTPError, shown_source: str) -> PipelineError:
    if str(error.reason).startswith(urllib.request.HTTPRedirectHandler.inf_msg):
        # urllib's own text is three lines; the loop is the whole story.
        return PipelineError(
            f"corpus source {shown_source} redirects in a loop (HTTP {error.code}, given up at "
            f"{masked(error.url)}); {CHECK_SOURCE}"
        )
    reason = " ".join(str(error.reason).split())
    return PipelineError(
        f"corpus download from {shown_source} failed with HTTP {error.code} {reason}; "
        f"{CHECK_SOURCE}"
    )


def open_with_retries(
    source: str, timeout_s: float, retry_delays_s: tuple[float, ...]
) -> BufferedIOBase:
    """Open the source, retrying with back-off when it is unreachable or answers 5xx or 429."""
    shown = masked(source)
    for attempt in range(len(retry_delays_s) + 1):
        last_attempt = attempt == len(retry_delays_s)
        try:
            return open_source(source, timeout_s)
        except urllib.error.HTTPError as error:
            if not (error.code >= 500 or error.code == 429) or last_attempt:
                raise http_error(error, shown) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if last_attempt:
                raise PipelineError(
                    f"corpus source {shown} is unreachable after {attempt + 1} attempts "
                    f"({reason or type(error).__name__}); offline, point {CORPUS_URL_ENV} at a "
                    "mirror, a file:// URL or a local copy"
                ) from None
        time.sleep(retry_delays_s[attempt])
    raise AssertionError("unreachable")


def download_verified(
    source: str,
    expected_sha256: str,
    output: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retry_delays_s: tuple[float, ...] = retry_delays(DEFAULT_BACKOFF_S),
    max_bytes: int = DEFAULT_MAX_BYTES,
    deadline_s: float = DEFAULT_DEADLINE_S,
    mismatch_hint: str = "",
) -> int:
    """Stream source to output, checking the sha256; return the size in bytes.

    mismatch_hint ends the message of a checksum mismatch (what to do about it).
    """
    shown = masked(source)
    transfer = Transfer(shown, max_bytes, time.monotonic() + deadline_s)
    with atomic_path(output) as tmp_path:
        try:
            with deadline(deadline_s):
                transfer.run(source, tmp_path, timeout_s, retry_delays_s)
        except DeadlinePassed:
            raise PipelineError(
                f"corpus download from {shown} did not finish within {DEADLINE_ENV} = "
                f"{deadline_s:g} s ({transfer.size:,} bytes had arrived); check the source, or "
                f"raise {DEADLINE_ENV} for a slow link"
            ) from None
        actual = transfer.digest.hexdigest()
        if actual != expected_sha256.lower():
            raise PipelineError(
                f"corpus from {shown} has sha256 {actual}, expected {expected_sha256} "
                f"(data.sha256); nothing was written to {output}{mismatch_hint}"
            )
    return transfer.size


class Transfer:
    """One download's progress: bytes so far and their digest, checked against its limits."""

    def __init__(self, shown_source: str, max_bytes: int, deadline_at: float):
        self.shown, self.max_bytes, self.deadline_at = shown_source, max_bytes, deadline_at
        self.size = 0
        self.digest = hashlib.sha256()

    def too_large(self) -> PipelineError:
        return PipelineError(
            f"corpus source {self.shown} is larger than {MAX_BYTES_ENV} = {self.max_bytes:,} "
            f"bytes; {CHECK_SOURCE}, or raise {MAX_BYTES_ENV}"
        )

    def run(self, source: str, tmp_path: Path, timeout_s: float, delays_s: tuple[float, ...]):
        with open_with_retries(source, timeout_s, delays_s) as response:
            announced = getattr(response, "headers", {}).get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) > self.max_bytes:
                raise self.too_large()
            with open(tmp_path, "wb") as out:
                while chunk := self.read_chunk(response):
                    self.size += len(chunk)
                    if self.size > self.max_bytes:
                        raise self.too_large()
                    self.digest.update(chunk)
                    # Outside read_chunk's handler: a full disk is not a broken transfer.
                    out.write(chunk)
        if announced is not None and announced.isdigit() and self.size < int(announced):
            raise PipelineError(
                f"corpus download from {self.shown} broke off after {self.size:,} of "
                f"{int(announced):,} bytes (the server closed the connection); rerun "
                "`dvc repro download`"
            )

    def read_chunk(self, response: BufferedIOBase) -> bytes:
        """The next bytes that have arrived (read1: a stalled transfer shows its progress)."""
        if time.monotonic() > self.deadline_at:
            raise DeadlinePassed  # where the timer cannot run (not the main thread)
        try:
            return response.read1(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as error:
            raise PipelineError(
                f"corpus download from {self.shown} broke off after {self.size:,} bytes "
                f"({error or type(error).__name__}); rerun `dvc repro download`"
            ) from None


def corpus_source(data: DataParams) -> str:
    """Where to fetch the corpus: ``$BIGRAM_CORPUS_URL`` (a mirror) or ``data.url``."""
    return os.environ.get(CORPUS_URL_ENV) or data.url


def override_hint(data: DataParams) -> str:
    """For a checksum mismatch: say that $BIGRAM_CORPUS_URL, not data.url, was fetched.

    Left exported for an offline Tiny Shakespeare, it silently wins over one's own text.
    """
    mirror = os.environ.get(CORPUS_URL_ENV)
    if not mirror or mirror == data.url:
        return ""
    return (
        f"; {CORPUS_URL_ENV} is set and overrides data.url ({masked(data.url)}): "
        f"`unset {CORPUS_URL_ENV}` to fetch data.url, or point it at a copy of that file"
    )


@dataclass(frozen=True)
class NetworkSettings:
    timeout_s: float
    retry_delays_s: tuple[float, ...]
    deadline_s: float
    max_bytes: int


def settings_from_env() -> NetworkSettings:
    """The download's knobs from the environment, each checked against its range."""
    return NetworkSettings(
        timeout_s=seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S),
        retry_delays_s=retry_delays(
            seconds_from_env(BACKOFF_ENV, DEFAULT_BACKOFF_S, MAX_BACKOFF_S)
        ),
        deadline_s=seconds_from_env(DEADLINE_ENV, DEFAULT_DEADLINE_S, MAX_DEADLINE_S),
        max_bytes=bytes_from_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES),
    )


def main() -> None:
    params = load_params()
    source = corpus_source(params.data)
    settings = settings_from_env()
    with runs.stage_run("download", params, run_name=runs.corpus_run_name("download", params)):
        mlflow.log_params({"data.url": masked(params.data.url), "data.sha256": params.data.sha256})
        # Where this machine fetched the corpus from goes to MLflow, never into download.json:
        # a DVC-tracked file must not differ between machines that fetched the same bytes.
        mlflow.set_tags({"corpus_source": masked(source), lineage.CORPUS_TAG: params.data.sha256})
        started = time.perf_counter()
        size = download_verified(
            source,
            params.data.sha256,
            CORPUS_PATH,
            settings.timeout_s,
            settings.retry_delays_s,
            settings.max_bytes,
            settings.deadline_s,
            mismatch_hint=override_hint(params.data),
        )
        seconds = time.perf_counter() - started
        mlflow.log_metrics(
            {
                "corpus_bytes": size,
                "download_seconds": seconds,
                "download_mb_per_s": size / 1e6 / max(seconds, 1e-9),
            }
        )
        write_json(DOWNLOAD_INFO_PATH, {"sha256": params.data.sha256, "bytes": size})
    print(f"downloaded {size:,} bytes from {masked(source)} to {CORPUS_PATH} (sha256 verified)")


if __name__ == "__main__":
    stage_entry_point(main, __doc__)()
