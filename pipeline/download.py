"""Stage 1, download: fetch the corpus, verify its sha256, write it atomically.

The source is params.yaml's ``data.url``, or ``$BIGRAM_CORPUS_URL`` (an http(s) URL, a file://
URL or a local path) on offline machines and mirrors; the checksum applies either way. The
corpus is streamed to a temporary file beside the output and renamed into place only once
verified, so the output path never holds a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

import mlflow

from pipeline import tracking
from pipeline.errors import PipelineError, stage_entry_point
from pipeline.files import atomic_path, write_json
from pipeline.params import CORPUS_URL_ENV, load_params

CORPUS_PATH = Path("data/raw/input.txt")
DOWNLOAD_INFO_PATH = Path("data/raw/download.json")

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30
RETRY_DELAYS_S = (1.0, 2.0, 4.0)


def open_source(source: str) -> BinaryIO:
    """Open an http(s) URL, a file:// URL or a local path for streaming reads."""
    scheme = urllib.parse.urlparse(source).scheme
    if scheme in ("http", "https", "file"):
        return urllib.request.urlopen(source, timeout=TIMEOUT_S)
    return open(source, "rb")


def open_with_retries(source: str, retry_delays_s=RETRY_DELAYS_S) -> BinaryIO:
    """Open the source, retrying with back-off when it is unreachable or answers 5xx."""
    for attempt in range(len(retry_delays_s) + 1):
        try:
            return open_source(source)
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == len(retry_delays_s):
                raise PipelineError(
                    f"corpus download from {source} failed with HTTP {error.code} {error.reason}; "
                    f"check data.url in params.yaml or {CORPUS_URL_ENV}"
                ) from None
        except FileNotFoundError:
            raise PipelineError(
                f"corpus source {source} does not exist; check data.url or {CORPUS_URL_ENV}"
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if attempt == len(retry_delays_s):
                reason = getattr(error, "reason", error)
                raise PipelineError(
                    f"corpus source {source} is unreachable after {attempt + 1} attempts "
                    f"({reason}); offline, point {CORPUS_URL_ENV} at a mirror, a file:// URL "
                    "or a local copy"
                ) from None
        time.sleep(retry_delays_s[attempt])
    raise AssertionError("unreachable")


def download_verified(source: str, expected_sha256: str, output: Path) -> int:
    """Stream source to output, checking the sha256; return the size in bytes."""
    digest = hashlib.sha256()
    size = 0
    with atomic_path(output) as tmp_path:
        with open_with_retries(source) as response, open(tmp_path, "wb") as out:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            except (OSError, urllib.error.URLError) as error:
                raise PipelineError(
                    f"corpus download from {source} broke off after {size} bytes ({error}); rerun"
                ) from None
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise PipelineError(
                f"corpus from {source} has sha256 {actual}, expected {expected_sha256} "
                f"(data.sha256); nothing was written to {output}"
            )
    return size


def main() -> None:
    params = load_params()
    source = params.data.source
    with tracking.stage_run("download", params, run_name="download") as run:
        mlflow.log_params({"data.url": params.data.url, "data.sha256": params.data.sha256})
        mlflow.set_tag("corpus_source", source)
        started = time.perf_counter()
        size = download_verified(source, params.data.sha256, CORPUS_PATH)
        seconds = time.perf_counter() - started
        mlflow.log_metrics(
            {
                "corpus_bytes": size,
                "download_seconds": seconds,
                "download_mb_per_s": size / 1e6 / max(seconds, 1e-9),
            }
        )
        write_json(
            DOWNLOAD_INFO_PATH,
            {
                "source": source,
                "sha256": params.data.sha256,
                "bytes": size,
                "mlflow_run_id": run.info.run_id,
            },
        )
    print(f"downloaded {size:,} bytes from {source} to {CORPUS_PATH} (sha256 verified)")


if __name__ == "__main__":
    stage_entry_point(main)()
