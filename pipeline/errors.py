"""Expected failures: one clear line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A failure the user can fix: the message says what is wrong, where, and how to fix it."""


class StageInterrupted(BaseException):
    """Raised on SIGTERM or SIGHUP so that a stopped stage unwinds like Ctrl-C (runs end KILLED).

    SIGHUP is what a stage gets when its terminal closes.
    """


EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
# Signals that stop a stage cleanly, as Ctrl-C does: `kill`, and the terminal closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum, frame):
    raise StageInterrupted(f"stopped by signal {signal.Signals(signum).name}")


def stage_entry_point(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's main(): expected errors become one line on stderr and exit status 1."""

    @functools.wraps(main)
    def wrapper() -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_interrupted)
        try:
            main()
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_ERROR)
        except (KeyboardInterrupt, StageInterrupted) as interruption:
            how = str(interruption) or "stopped by Ctrl-C (SIGINT)"
            print(f"error: {how}; no partial output was left, rerun the stage", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
