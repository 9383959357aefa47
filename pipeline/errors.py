"""The failures a user can fix, as exceptions; pipeline.cli turns them into one line on stderr."""

from __future__ import annotations

import errno
import re
import shutil


class PipelineError(Exception):
    """A failure the user can fix: the message says what is wrong, where, and how to fix it."""


class StageInterrupted(BaseException):
    """Raised on SIGTERM or SIGHUP so that a stopped stage unwinds like Ctrl-C (runs end KILLED).

    SIGHUP is what a stage gets when its terminal closes.
    """


class PeerProcessEnded(StageInterrupted):
    """Another training process of the stage (torchrun) ended mid-step, so this one's exchange
    with it failed: this process stops as a signal stops it (its run ends KILLED, no partial
    output is left) and prints nothing, since the launcher names the process that ended and how.
    """


# A full file system, a full quota, or the file size limit (ulimit -f, RLIMIT_FSIZE).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_cause(error: BaseException) -> OSError | None:
    """The full-disk OSError behind error, if any: libraries may wrap it (torch's zip writer
    raises RuntimeError("unexpected pos") while handling it), and shutil.copytree, which MLflow
    copies a model's code with, gathers its files' failures in a shutil.Error as text."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return current
        if isinstance(current, shutil.Error):
            listed = _disk_full_in_copy_errors(current)
            if listed is not None:
                return listed
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# How shutil.copytree lists a file's failure: str(OSError), "[Errno 28] No space left on device"
# and, when the OSError named a file, ": '<path>'" after it.
_LISTED_OS_ERROR = re.compile(r"\[Errno (\d+)\] ([^:]+)")


def _disk_full_in_copy_errors(error: shutil.Error) -> OSError | None:
    """The first full-disk failure in a shutil.Error's list of (source, target, reason), as the
    OSError it was, naming the target that could not be written."""
    listed = error.args[0] if error.args else None
    if not isinstance(listed, list):
        return None  # shutil.copyfile raises Error("... are the same file") with a message.
    for entry in listed:
        if not (isinstance(entry, tuple) and len(entry) == 3):
            continue
        _source, target, reason = entry
        match = _LISTED_OS_ERROR.match(str(reason))
        if match is not None and int(match.group(1)) in DISK_FULL:
            return OSError(int(match.group(1)), match.group(2), str(target))
    return None
