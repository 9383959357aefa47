"""Stage 1, download: fetch the corpus, verify its sha256, write it atomically.

The source is params.yaml's ``data.url``, or ``$BIGRAM_CORPUS_URL`` (an http(s) URL, a file://
URL or a local path) on offline machines and mirrors; the checksum applies either way. The
corpus is streamed to a temporary file beside the output and renamed into place only once
verified, so the output path never holds a partial or unverified file. An unreachable source
is retried 3 times with doubling pauses; ``$BIGRAM_DOWNLOAD_TIMEOUT_S`` (default 30) and
``$BIGRAM_DOWNLOAD_BACKOFF_S`` (the first pause, default 1) tune that for slow or flaky links.
A source larger than ``$BIGRAM_DOWNLOAD_MAX_BYTES`` (default 1 GiB) is refused, so that one that
never ends (``/dev/zero``, a misbehaving server) cannot fill the disk. A user and password in an
http(s) URL are sent as basic auth and shown and stored as ``user:***``.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

import mlflow

from pipeline import tracking
from pipeline.cli import stage_entry_point
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json
from pipeline.params import CORPUS_URL_ENV, DataParams, load_params
from pipeline.paths import CORPUS_PATH, DOWNLOAD_INFO_PATH
from pipeline.secrets import basic_auth_header, masked, split_credentials

CHUNK_BYTES = 1 << 20
# Network knobs, from the environment because they do not change the corpus (DVC ignores them):
# seconds to wait for the server, and the first pause before a retry (then doubled each time).
TIMEOUT_ENV = "BIGRAM_DOWNLOAD_TIMEOUT_S"
BACKOFF_ENV = "BIGRAM_DOWNLOAD_BACKOFF_S"
MAX_BYTES_ENV = "BIGRAM_DOWNLOAD_MAX_BYTES"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_BACKOFF_S = 1.0
# Tiny Shakespeare is 1.1 MB; a corpus a thousand times larger still fits.
DEFAULT_MAX_BYTES = 1 << 30
RETRIES = 3
# A local source (path or file:// URL) that is missing or unreadable: retrying will not help.
LOCAL_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise PipelineError(f"{name} must be a number of seconds > 0, got {text!r}")
    return seconds


def bytes_from_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise PipelineError(f"{name} must be a whole number of bytes > 0, got {text!r}")
    return int(text)


def retry_delays(backoff_s: float) -> tuple[float, ...]:
    return tuple(backoff_s * 2**attempt for attempt in range(RETRIES))


def open_source(source: str, timeout_s: float) -> BinaryIO:
    """Open an http(s) URL, a file:// URL or a local path for streaming reads."""
    scheme = urllib.parse.urlparse(source).scheme
    if scheme in ("http", "https"):
        # urllib would take user:password@host for a host name.
        url, user, password = split_credentials(source)
        headers = basic_auth_header(user, password) if user is not None else {}
        return urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        )
    if scheme == "file":
        return urllib.request.urlopen(source, timeout=timeout_s)
    return open(source, "rb")


def open_with_retries(source: str, timeout_s: float, retry_delays_s: tuple[float, ...]) -> BinaryIO:
    """Open the source, retrying with back-off when it is unreachable or answers 5xx or 429."""
    shown = masked(source)
    for attempt in range(len(retry_delays_s) + 1):
        last_attempt = attempt == len(retry_delays_s)
        try:
            return open_source(source, timeout_s)
        except urllib.error.HTTPError as error:
            if not (error.code >= 500 or error.code == 429) or last_attempt:
                raise PipelineError(
                    f"corpus download from {shown} failed with HTTP {error.code} {error.reason}; "
                    f"check data.url in params.yaml or {CORPUS_URL_ENV}"
                ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, LOCAL_FILE_ERRORS):
                raise PipelineError(
                    f"corpus source {shown} cannot be read ({reason.strerror}); "
                    f"check data.url in params.yaml or {CORPUS_URL_ENV}"
                ) from None
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
) -> int:
    """Stream source to output, checking the sha256; return the size in bytes."""
    shown = masked(source)
    too_large = (
        f"corpus source {shown} is larger than {MAX_BYTES_ENV} = {max_bytes:,} bytes; check "
        f"data.url in params.yaml or {CORPUS_URL_ENV}, or raise {MAX_BYTES_ENV}"
    )
    digest = hashlib.sha256()
    size = 0
    with atomic_path(output) as tmp_path:
        with open_with_retries(source, timeout_s, retry_delays_s) as response:
            announced = getattr(response, "headers", {}).get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) > max_bytes:
                raise PipelineError(too_large)
            with open(tmp_path, "wb") as out:
                while chunk := read_chunk(response, shown, size):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PipelineError(too_large)
                    digest.update(chunk)
                    # Outside read_chunk's handler: a full disk is not a broken transfer.
                    out.write(chunk)
        if announced is not None and announced.isdigit() and size < int(announced):
            raise PipelineError(
                f"corpus download from {shown} broke off after {size:,} of {int(announced):,} "
                "bytes (the server closed the connection); rerun `dvc repro download`"
            )
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise PipelineError(
                f"corpus from {shown} has sha256 {actual}, expected {expected_sha256} "
                f"(data.sha256); nothing was written to {output}"
            )
    return size


def read_chunk(response: BinaryIO, shown_source: str, size: int) -> bytes:
    """The next bytes that have arrived (read1: a stalled transfer shows its progress)."""
    try:
        return response.read1(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as error:
        raise PipelineError(
            f"corpus download from {shown_source} broke off after {size:,} bytes "
            f"({error or type(error).__name__}); rerun `dvc repro download`"
        ) from None


def corpus_source(data: DataParams) -> str:
    """Where to fetch the corpus: ``$BIGRAM_CORPUS_URL`` (a mirror) or ``data.url``."""
    return os.environ.get(CORPUS_URL_ENV) or data.url


def main() -> None:
    params = load_params()
    source = corpus_source(params.data)
    timeout_s = seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    delays_s = retry_delays(seconds_from_env(BACKOFF_ENV, DEFAULT_BACKOFF_S))
    max_bytes = bytes_from_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)
    with tracking.stage_run("download", params, run_name="download"):
        mlflow.log_params({"data.url": masked(params.data.url), "data.sha256": params.data.sha256})
        # Where this machine fetched the corpus from goes to MLflow, never into download.json:
        # a DVC-tracked file must not differ between machines that fetched the same bytes.
        mlflow.set_tags({"corpus_source": masked(source), "corpus_sha256": params.data.sha256})
        started = time.perf_counter()
        size = download_verified(
            source, params.data.sha256, CORPUS_PATH, timeout_s, delays_s, max_bytes
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
