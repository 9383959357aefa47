"""Real faults for the tests: a full file system, a file size limit, file modes that hold even
for root, a server that asks for a password, and a search for a secret in everything a run
leaves behind."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The file that fills a small file system; not an output of anything.
FILLER = ".filler"


def can_mount() -> bool:
    """Whether this machine lets the tests mount a tmpfs (root, or a container that allows it)."""
    probe = Path(tempfile.mkdtemp(prefix="bigram-mount-probe-"))
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
        )
        if mounted.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    except OSError:
        return False
    finally:
        probe.rmdir()


@contextlib.contextmanager
def full_file_system(directory: Path, free_bytes: int) -> Iterator[Path]:
    """Mount a small tmpfs over directory, its files copied in, and fill it up to free_bytes.

    A real ENOSPC for whoever writes there next; check the directory inside the block, as the
    mount goes at its end. Skips where mounting is not allowed.
    """
    if not can_mount():
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    directory.mkdir(parents=True, exist_ok=True)
    saved = Path(tempfile.mkdtemp(prefix="bigram-saved-"))
    shutil.copytree(directory, saved, dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) + (1 << 20)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )
    try:
        shutil.copytree(saved, directory, dirs_exist_ok=True)
        free = shutil.disk_usage(directory).free
        (directory / FILLER).write_bytes(b"\0" * max(0, free - free_bytes))
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        shutil.rmtree(saved)


def file_size_limit(limit_bytes: int) -> Callable[[], None]:
    """preexec_fn for a child whose writes past limit_bytes fail with EFBIG (RLIMIT_FSIZE).

    SIGXFSZ is ignored, as the shell's `ulimit -f` users expect an error rather than a kill.
    """

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def without_permission_override() -> list[str]:
    """A command prefix under which file modes hold for this process, even as root.

    Root passes every file mode through the capabilities CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH; without them, root is an owner like any other (mode 444 is read-only,
    000 unreadable). An unprivileged user needs no prefix.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): file modes cannot be enforced")
    dropped = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={dropped}", f"--inh-caps={dropped}"]


class BasicAuthCorpus(http.server.SimpleHTTPRequestHandler):
    """Serves a directory to requests that carry the right basic-auth user and password."""

    def do_GET(self):
        expected = base64.b64encode(self.server.credentials.encode()).decode()
        if self.headers.get("Authorization") != f"Basic {expected}":
            self.server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="corpus"')
            self.end_headers()
            return
        self.server.served += 1
        super().do_GET()

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def basic_auth_server(directory: Path, user: str, password: str) -> Iterator:
    handler = functools.partial(BasicAuthCorpus, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.credentials, server.refused, server.served = f"{user}:{password}", 0, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield server
    finally:
        server.shutdown()
        server.server_close()


def files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under roots whose bytes hold secret: outputs, the store, DVC's cache, logs."""
    needle = secret.encode()
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
    return found
