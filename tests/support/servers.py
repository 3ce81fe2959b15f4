"""A real HTTP server on this machine, in a thread, for tests that talk to one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextlib.contextmanager
def serving(
    handler: type[BaseHTTPRequestHandler] | Any, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve ``handler`` on ``host`` (at ``port`` when it is free, else any); the base URL."""
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError:
        if not port:
            raise
        server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
