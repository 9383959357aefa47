"""The failures a user can fix, as exceptions; pipeline.cli turns them into one line on stderr."""

from __future__ import annotations

import errno


class PipelineError(Exception):
    """A failure the user can fix: the message says what is wrong, where, and how to fix it."""


class StageInterrupted(BaseException):
    """Raised on SIGTERM or SIGHUP so that a stopped stage unwinds like Ctrl-C (runs end KILLED).

    SIGHUP is what a stage gets when its terminal closes.
    """


# A full file system, a full quota, or the file size limit (ulimit -f, RLIMIT_FSIZE).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_cause(error: BaseException) -> OSError | None:
    """The full-disk OSError behind error, if any: libraries may wrap it (torch's zip writer
    raises RuntimeError("unexpected pos") while handling it)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
