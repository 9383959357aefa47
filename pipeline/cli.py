"""How a stage or command runs from the command line: expected failures become one clear line
on stderr and a non-zero exit, no traceback; SIGTERM and SIGHUP stop it as Ctrl-C does; a stage
takes no arguments and ends with the process that runs it.

A stop signal is one line and exit 130 at every moment of a stage's life:

- while its modules load (``stop_cleanly_while_loading``, called by pipeline/__init__.py for
  `python -m pipeline.stages.<stage>`): nothing has been written yet, so the stage exits at once;
- while main() runs: it unwinds, so that the MLflow run ends KILLED and outputs are removed;
- once main() has returned: the work is done and its outputs complete, so the signal is
  ignored and the stage exits 0. The interpreter's shutdown (torch's and MLflow's teardown)
  runs after Python has put back the default handlers, which would end it -15 without a word.

A stage is quiet about MLflow: no usage telemetry, no INFO lines, no progress bars
(``quiet_mlflow_by_default``); MLflow's warnings stay.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

from pipeline.errors import PeerProcessEnded, PipelineError, StageInterrupted, disk_full_cause
from pipeline.secrets import masked

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
# Signals that stop a stage cleanly, as Ctrl-C does: `kill`, and the terminal closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# Ctrl-C too: every signal that stops a stage.
INTERRUPT_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)
# Signals this process was started with ignored (`nohup` ignores SIGHUP, a background job of a
# script SIGINT): they stay ignored, as the user asked.
IGNORED_AT_START = frozenset(
    signum for signum in INTERRUPT_SIGNALS if signal.getsignal(signum) == signal.SIG_IGN
)
# The process that started this one, as it was when this module loaded.
PARENT_AT_START = os.getppid()
# prctl(2): ask the kernel for a signal when the parent process ends (Linux).
PR_SET_PDEATHSIG = 1
# How often a stage run through DVC's shell checks that DVC still runs (see watch_pipeline).
PIPELINE_CHECK_INTERVAL_S = 0.5
# MLflow's documented switches, each a default that the user's own setting overrides
# (docs/OPERATIONS.md, "What a stage prints"). MLflow reads the first two when it is imported.
QUIET_MLFLOW = {
    # No usage telemetry: MLflow would otherwise fetch a remote config in a thread of every
    # stage, and join its threads at exit. MLFLOW_DISABLE_TELEMETRY=false turns it back on.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # No INFO lines ("Creating initial MLflow database tables...", "Validating input example
    # against model signature"): the stage says what it did. Warnings stay.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # No "Downloading artifacts" bar for each file MLflow copies while logging a model.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def quiet_mlflow_by_default() -> None:
    """Set QUIET_MLFLOW's defaults in this process (and its children), before MLflow loads.

    Called when this module loads: pipeline/__init__.py imports it first in a stage process
    (`python -m pipeline.stages.<stage>`), before the stage's own imports load MLflow.
    """
    for name, value in QUIET_MLFLOW.items():
        os.environ.setdefault(name, value)


quiet_mlflow_by_default()


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


def stop_reason(signum: int) -> str:
    if signum == signal.SIGINT:
        return "stopped by Ctrl-C (SIGINT)"
    return f"stopped by signal {signal.Signals(signum).name}"


def _raise_interrupted(signum, frame):
    # The first stop unwinds main(); a second must not cut that clean-up short (its MLflow run
    # would be left for MLflow's exit handler to end FINISHED). When dvc dies, the kernel's
    # SIGTERM (end_with_parent) and DVC's own can arrive together; or Ctrl-C is pressed twice.
    ignore_interrupt_signals()
    raise StageInterrupted(stop_reason(signum))


def _exit_while_loading(signum, frame):
    # os._exit: an exception raised inside some module's import would print that import's
    # traceback, or be swallowed by a library's `except BaseException`.
    print(
        f"error: {stop_reason(signum)} while the stage was starting; nothing was written, "
        "rerun the stage",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_INTERRUPTED)


def _handle_interrupt_signals(handler) -> None:
    for signum in INTERRUPT_SIGNALS:
        if signum not in IGNORED_AT_START:
            signal.signal(signum, handler)


def stop_cleanly_while_loading() -> None:
    """Until stage_entry_point runs main(), a stop signal is one line and exit 130.

    Without it, Ctrl-C while a stage imports MLflow and torch (seconds) prints the import's
    KeyboardInterrupt traceback, and SIGTERM ends it -15 without a word.
    """
    _handle_interrupt_signals(_exit_while_loading)
    end_with_parent()


def end_with_parent() -> None:
    """Stop this process (as SIGTERM does) when the process that runs it ends.

    `kill <dvc pid>` ends DVC alone: its stage would go on as an orphan and later write
    model.pt and run.json into a workspace that a newer `dvc repro` owns. The kernel signals us
    when the parent ends (Linux's PR_SET_PDEATHSIG); a parent that ended before we asked shows
    as a changed parent process id. DVC runs a stage's command through `$SHELL -c`, and a shell
    that does not replace itself by the command (dash, /bin/sh on Debian) stays our parent when
    DVC dies: then DVC, the shell's parent, is watched too.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != PARENT_AT_START:
        signal.raise_signal(signal.SIGTERM)
        return
    if os.environ.get("DVC_STAGE") and _is_dvcs_shell(PARENT_AT_START):
        watch_pipeline(PARENT_AT_START)


def _is_dvcs_shell(pid: int) -> bool:
    """Whether pid runs the shell DVC runs stage commands with ($SHELL, else /bin/sh)."""
    import shutil

    shell = shutil.which(os.environ.get("SHELL") or "/bin/sh")
    try:
        return shell is not None and os.path.samefile(f"/proc/{pid}/exe", shell)
    except OSError:
        return False


def _parent_of(pid: int) -> int | None:
    """The parent process id of pid (from /proc), or None once pid has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Fields after the command name, which is in parentheses and may hold spaces.
            return int(stat.read().rpartition(b")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


_watched: set[int] = set()


def watch_pipeline(shell_pid: int) -> None:
    """SIGTERM this process once the shell between DVC and it loses its parent (DVC ended)."""
    pipeline_pid = _parent_of(shell_pid)
    if pipeline_pid is None or shell_pid in _watched:
        return
    _watched.add(shell_pid)

    def watch() -> None:
        while _parent_of(shell_pid) == pipeline_pid:
            time.sleep(PIPELINE_CHECK_INTERVAL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-pipeline", daemon=True).start()


def ignore_interrupt_signals() -> None:
    """The stage's work is done, or its clean-up under way: a stop signal now has nothing left
    to stop, and must not cut the clean-up short.

    SIG_IGN holds through the interpreter's shutdown, where Python handlers no longer run.
    """
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


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
        # From here on a stop unwinds main(): its MLflow run ends KILLED, its outputs go.
        _handle_interrupt_signals(_raise_interrupted)
        try:
            end_with_parent()
            main()
        except PipelineError as error:
            fail(str(error))
        except PeerProcessEnded:
            sys.exit(EXIT_INTERRUPTED)
        except (KeyboardInterrupt, StageInterrupted) as interruption:
            how = str(interruption) or stop_reason(signal.SIGINT)
            print(f"error: {how}; no partial output was left, rerun the stage", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as error:
            # Whoever wrote (numpy, torch, MLflow copying artifacts), a full disk is the same fix.
            full = disk_full_cause(error)
            if full is not None:
                fail(disk_full_message(full))
            fail_with_traceback()
        ignore_interrupt_signals()

    return wrapper
