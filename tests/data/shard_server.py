"""A local HTTP server (127.0.0.1, a thread) serving tar shards from memory, with connections that can be cut.

``ShardServer.files`` maps URL paths to bytes; ``ShardServer.drops`` maps a path to ``[cut_at, times]``: the next
``times`` requests of that path send the full ``Content-Length`` header but only ``cut_at`` bytes of the body, then
the connection is closed (a dropped connection mid-shard). ``requests`` counts GETs per path; ``send_length=False``
leaves ``Content-Length`` out, so a cut body is only seen as a tar that ends early.
"""

from __future__ import annotations

import collections
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        owner = self.server.owner
        owner.requests[self.path] += 1
        data = owner.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        drop = owner.drops.get(self.path)
        body = data
        if drop is not None and drop[1] > 0:
            drop[1] -= 1
            body = data[: drop[0]]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        if owner.send_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if body is not data:
            time.sleep(0.3)  # the client takes the samples sent so far before it sees the connection drop
        self.close_connection = True

    def do_HEAD(self) -> None:  # noqa: N802
        data = self.server.owner.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ShardServer


class ShardServer:
    """``with ShardServer() as server: server.files["/a.tar"] = ...; url = server.url("/a.tar")``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drops: dict[str, list[int]] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        #: send Content-Length (else the body ends when the connection closes: a cut looks like a short file)
        self.send_length = True
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
