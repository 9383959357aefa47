"""How a stage or command runs from the command line: expected failures become one clear line
on stderr and a non-zero exit, no traceback; SIGTERM and SIGHUP stop it as Ctrl-C does; a stage
takes no arguments."""

from __future__ import annotations

import argparse
import functools
import gc
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from pipeline.errors import PipelineError, StageInterrupted, disk_full_cause
from pipeline.secrets import masked

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
# Signals that stop a stage cleanly, as Ctrl-C does: `kill`, and the terminal closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def disk_full_message(error: OSError) -> str:
    """One line naming the file that could not be written; error.filename2 is a copy's target."""
    where = error.filename2 or error.filename or "a file"
    return (
        f"cannot write {where} ({error.strerror}): free space on its file system (or raise the "
        "file size limit, `ulimit -f`) and rerun the stage; no partial output was left"
    )


def fail(message: str) -> NoReturn:
    # Masked here, where every message passes, so that none can show a password.
    print(f"error: {masked(message)}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def fail_with_traceback() -> NoReturn:
    """A bug, not a user's mistake: keep the traceback, but without any password in it."""
    print(masked(traceback.format_exc()), end="", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def _raise_interrupted(signum, frame):
    raise StageInterrupted(f"stopped by signal {signal.Signals(signum).name}")


def reject_arguments(prog: str, description: str) -> None:
    """A stage takes no arguments: --help says what it does, anything else is a usage error.

    Its inputs are params.yaml and the files of dvc.yaml; a flag such as `--lr 3e-3` must not
    start a run that silently ignores it.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Its params come from params.yaml; DVC runs it (`dvc repro`, "
        "`dvc exp run -S train.lr=3e-3`).",
    )
    parser.parse_args()


def stage_entry_point(
    main: Callable[[], None], description: str | None = None
) -> Callable[[], None]:
    """Wrap a stage's main(): expected errors become one line on stderr and exit status 1.

    With a description (the stage module's docstring), the stage takes no command-line
    arguments: see reject_arguments. Without one, main parses its own.
    """

    @functools.wraps(main)
    def wrapper() -> None:
        if description is not None:
            module = sys.modules[main.__module__]
            spec = getattr(module, "__spec__", None)
            reject_arguments(f"python -m {spec.name if spec else main.__module__}", description)
        # pipeline/__init__.py turned the garbage collector off while the stage's modules loaded.
        gc.enable()
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_interrupted)
        try:
            main()
        except PipelineError as error:
            fail(str(error))
        except (KeyboardInterrupt, StageInterrupted) as interruption:
            how = str(interruption) or "stopped by Ctrl-C (SIGINT)"
            print(f"error: {how}; no partial output was left, rerun the stage", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as error:
            # Whoever wrote (numpy, torch, MLflow copying artifacts), a full disk is the same fix.
            full = disk_full_cause(error)
            if full is not None:
                fail(disk_full_message(full))
            fail_with_traceback()

    return wrapper
