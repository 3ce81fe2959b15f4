"""The archive client's timeout is a total: a server that trickles its reply is cut off."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from casaspawner.datasets.archive import AlmaDataLinkClient
from casaspawner.datasets.ids import parse_uid
from casaspawner.errors import ArchiveUnavailable


class Trickle(BaseHTTPRequestHandler):
    """Answers 200, then one byte of a VOTable every 0.2 seconds, for minutes."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-votable+xml")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def trickle() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_trickling_archive_is_cut_off_at_the_timeout(trickle: str, tmp_path: Path) -> None:
    client = AlmaDataLinkClient(trickle, timeout=1.0, cache_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(ArchiveUnavailable, match="did not answer within 1 second;"):
        client.fetch_manifest(parse_uid("uid://A001/X1/X2"))
    assert time.monotonic() - started < 2
