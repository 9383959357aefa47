"""Atomic file writes: a stage's output path holds the complete file or nothing."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipelineError, disk_full_cause


def _umask_file_mode() -> int:
    """The mode open() would give a new file (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# mkstemp creates files readable by their owner only; outputs should look like any other file.
FILE_MODE = _umask_file_mode()


def process_is_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Alive, owned by another user.
    return True


def remove_stale_temp_files(path: Path) -> None:
    """Delete temporary files for ``path`` left by writers that died (SIGKILL, power loss).

    Temporary names carry the writer's process id, so a file of a writer still running is kept.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name.removeprefix(f".{path.name}.").split(".", 1)[0]
        if pid.isdigit() and not process_is_alive(int(pid)):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    The rename is atomic on POSIX, so a reader (or a killed process) never sees a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except Exception as error:
        # A write through a file object names no file: a full disk must name the output.
        full = disk_full_cause(error)
        if full is not None and full.filename is None:
            full.filename = str(path)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the block succeeds."""
    with atomic_path(path) as tmp_path, open(tmp_path, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: Path, payload: Any) -> None:
    """Write payload as JSON, atomically. NaN and infinity are refused (ValueError, nothing
    written): Python would write them as NaN and Infinity, which is not JSON."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.write("\n")


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, required: Mapping[str, type | tuple[type, ...]] | None = None) -> Any:
    """Read a JSON file; with ``required``, check it is an object holding those keys and types.

    Stages check their inputs this way before they start removing outputs on failure, so a
    damaged input (``{}``, a zero-byte file) stops them with the previous outputs intact.
    """
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro` to rebuild it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(
            f"{path} is not valid JSON ({error}): it is damaged; rerun `dvc repro --force` "
            "for the stage that writes it"
        ) from None
    except OSError as error:
        raise PipelineError(f"{path} cannot be read ({error.strerror})") from None
    for key, kind in (required or {}).items():
        if not isinstance(payload, dict) or not isinstance(payload.get(key), kind):
            raise PipelineError(
                f"{path} has no valid '{key}': it is damaged; rerun `dvc repro --force` for the "
                "stage that writes it"
            )
    return payload


@contextlib.contextmanager
def outputs_removed_on_failure(*paths: Path) -> Iterator[None]:
    """Remove a stage's outputs if it fails part-way, so no stale or partial set is left."""
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
