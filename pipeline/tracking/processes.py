"""Which process a run belongs to, and whether that process has gone: the standard library only.

Every stage's run is tagged with its host, pid and process identity (``process_tags``). A stage
killed by SIGKILL, the out-of-memory killer or a power cut cannot end its run; the next stage
ends it (runs.end_runs_of_dead_processes, the one reaper) once ``run_process_has_gone`` says so.
The link stage asks ``abandoned_runs_in_sqlite`` first, with sqlite3 and without MLflow, so that
a no-op `dvc repro` stays under a second.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.files import process_is_alive
from pipeline.tracking.store import read_sqlite

if TYPE_CHECKING:
    pass


# Which process runs a run, so that a later stage can end the runs of stages that were killed.
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
# Where that pid means something: the boot, the pid namespace and the process's start time
# (see run_process_has_gone).
PROCESS_TAG = "pipeline.process"


def process_tags() -> dict[str, str]:
    """Tags naming the process that runs a run: see end_runs_of_dead_processes in tracking."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    identity = process_identity()
    if identity is not None:
        tags[PROCESS_TAG] = identity
    return tags


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace: the same host name may hold several (containers)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _start_ticks(pid: int | str) -> str | None:
    """When process pid (or "self") started, in clock ticks since boot; None if it has gone or
    is a zombie, dead but not yet reaped by its parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def process_identity() -> str | None:
    """``<boot id>/<pid namespace>/<start ticks>`` of this process, or None where /proc does
    not say (not Linux)."""
    boot_id, namespace, start = _boot_id(), _pid_namespace(), _start_ticks("self")
    if boot_id is None or namespace is None or start is None:
        return None
    return f"{boot_id}/{namespace}/{start}"


def run_process_has_gone(pid: str, identity: str | None) -> bool:
    """Whether the process a run of this host names (its pipeline.pid and pipeline.process
    tags) has ended; False when this process cannot tell.

    A process of another boot has ended: the host restarted since (a host of the same name on
    another machine is not told apart). One of another pid namespace, a second container of
    the same host name, is not ours to see: its pid here is another process, or none. In ours,
    a pid whose process started at another time names a newer process. Runs of older versions
    carry no identity: their pid alone is checked.
    """
    if not pid.isdigit():
        return False
    if not identity:
        return not process_is_alive(int(pid))
    boot, namespace, start = (identity.split("/") + ["", "", ""])[:3]
    if boot != _boot_id():
        return True
    if namespace != _pid_namespace():
        return False
    return _start_ticks(int(pid)) != start


def abandoned_runs_in_sqlite(path: Path) -> bool | None:
    """Whether a SQLite store holds a run RUNNING on this host whose process has gone.

    None when the store cannot be read read-only.
    """
    if not path.is_file():
        return False
    query = """
        SELECT host.value, pid.value, process.value FROM runs
        JOIN tags AS host ON host.run_uuid = runs.run_uuid AND host.key = ?
        JOIN tags AS pid ON pid.run_uuid = runs.run_uuid AND pid.key = ?
        LEFT JOIN tags AS process ON process.run_uuid = runs.run_uuid AND process.key = ?
        WHERE runs.status = 'RUNNING'
    """
    rows = read_sqlite(path, query, (HOST_TAG, PID_TAG, PROCESS_TAG))
    if rows is None:
        return None
    host = socket.gethostname()
    return any(
        found_host == host and run_process_has_gone(pid, identity)
        for found_host, pid, identity in rows
    )
