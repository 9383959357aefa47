"""HTTP on 127.0.0.1: a corpus server with every fault a mirror can have, and a small JSON
client. Server processes (`mlflow server`, the S3 server) are testbed's: benchmarks start them
too."""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

WRONG_BODY = b"To be, or not to be: that is not the corpus.\n"
SENT_BEFORE_STALL = 64 * 1024
# A dripping source sends a byte this often, well inside any time-out per read.
DRIP_INTERVAL_S = 0.05
# What an endless source sends at most before it stops by itself.
ENDLESS_BYTES = 256 << 20


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """/status/<code> answers that status; /wrong a short wrong corpus; /partial/<n> announces
    the whole corpus, sends n bytes and hangs up; /stall/<n> sends n bytes, then stalls;
    /drip sends the corpus a byte at a time, /drip-headers its headers; /endless sends zeros
    with no Content-Length; /redirect?to=<url> answers 302 to url, /loop to itself;
    /input.txt is the corpus, /health OK. Every request's headers are kept in server.seen."""

    def do_GET(self):
        server = self.server
        server.requests[self.path] += 1
        server.seen.append((self.path, dict(self.headers)))
        parts = urllib.parse.urlsplit(self.path)
        kind, _, arg = parts.path.strip("/").partition("/")
        if kind in ("redirect", "loop"):
            target = urllib.parse.parse_qs(parts.query)["to"][0] if kind == "redirect" else "/loop"
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "status":
            self.send_error(int(arg))
            return
        if kind in ("drip", "drip-headers", "endless"):
            with contextlib.suppress(OSError):  # the client gave up
                getattr(self, kind.replace("-", "_"))(server)
            self.close_connection = True
            return
        body = {"wrong": WRONG_BODY, "health": b"OK"}.get(kind, server.corpus)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind in ("wrong", "health", "input.txt"):
            self.wfile.write(body)
            return
        self.wfile.write(body[: int(arg)])
        self.wfile.flush()
        if kind == "stall":
            server.sent.set()
            server.release.wait(timeout=120)
        self.close_connection = True

    def drip_bytes(self, server, data: bytes) -> None:
        """Send data a byte at a time; stops when the client or the fixture gives up."""
        for byte in data:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if server.release.wait(DRIP_INTERVAL_S):
                return

    def drip(self, server):
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.corpus)))
        self.end_headers()
        self.drip_bytes(server, server.corpus[:400])

    def drip_headers(self, server):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        self.drip_bytes(server, b"." * 400)

    def endless(self, server):
        self.send_response(200)
        self.end_headers()
        zeros = bytes(1 << 20)
        for _ in range(ENDLESS_BYTES // len(zeros)):
            self.wfile.write(zeros)

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def start_faulty_server(corpus: bytes) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    server.daemon_threads = True
    server.corpus = corpus
    server.requests = collections.Counter()
    server.seen = []
    server.sent, server.release = threading.Event(), threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def request_json(url: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    """GET, or POST JSON when payload is given; returns (status, body) even for errors."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
