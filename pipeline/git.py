"""The git repository the pipeline runs in: every git command the pipeline runs is here.

A DVC repository is a git repository, but a stage must not fail where git cannot answer (git
missing, a copy without .git): each function then answers None, or does nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(*args: str) -> str | None:
    """The stdout of `git <args>`, or None when git fails or is missing."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def head_commit() -> str | None:
    """The full hash of HEAD."""
    output = git("rev-parse", "HEAD")
    return output.strip() if output else None


def code_version() -> str:
    """``<branch>@<short commit>`` of the working tree (``unknown`` for what git cannot say)."""
    branch = (git("rev-parse", "--abbrev-ref", "HEAD") or "").strip() or "unknown"
    commit = (git("rev-parse", "--short", "HEAD") or "").strip() or "unknown"
    return f"{branch}@{commit}"


def changed_tracked_files() -> list[str] | None:
    """The tracked files that differ from HEAD (a rename by its new path), sorted."""
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is None:
        return None
    return sorted(line[3:].split(" -> ")[-1] for line in status.splitlines())


def stage_ignored_file(path: Path) -> None:
    """`git add --force path`: stage a file git ignores. Best effort: a failure changes nothing."""
    subprocess.run(["git", "add", "--force", "--", str(path)], capture_output=True, check=False)
