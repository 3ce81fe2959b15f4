"""The archive client's timeout is a total, and its size limit holds.

A server that trickles its reply (body or headers) is cut off at the total; a lookup of several
requests ends at the total too; a compressed reply is measured unpacked.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.alma import serve_archive

from casaspawner.datasets.archive import AlmaDataLinkClient
from casaspawner.datasets.ids import parse_uid
from casaspawner.errors import ArchiveUnavailable


def trickle_body(handler: BaseHTTPRequestHandler) -> None:
    """200, then one byte of a VOTable every 0.2 seconds, for minutes."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/x-votable+xml")
    handler.end_headers()
    for _ in range(1000):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.2)


def trickle_headers(handler: BaseHTTPRequestHandler) -> None:
    """The status line, then one header line every 0.2 seconds, for minutes."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for index in range(1000):
        handler.wfile.write(f"X-Slow-{index}: 1\r\n".encode())
        handler.wfile.flush()
        time.sleep(0.2)


def gzip_bomb(handler: BaseHTTPRequestHandler) -> None:
    """17 MiB of spaces, sent gzip-encoded in a few kilobytes."""
    body = gzip.compress(b" " * (17 << 20))
    handler.send_response(200)
    handler.send_header("Content-Type", "application/x-votable+xml")
    handler.send_header("Content-Encoding", "gzip")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler], None]], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Callable[[BaseHTTPRequestHandler], None]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    answer(self)
                except OSError:
                    return

            def log_message(self, *args: object) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("answer", [trickle_body, trickle_headers])
def test_a_trickling_archive_is_cut_off_at_the_timeout(serve, tmp_path: Path, answer) -> None:
    client = AlmaDataLinkClient(serve(answer), timeout=1.0, cache_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(ArchiveUnavailable, match="did not answer within 1 second;"):
        client.fetch_manifest(parse_uid("uid://A001/X1/X2"))
    assert time.monotonic() - started < 1.5


def test_the_timeout_bounds_the_whole_lookup(tmp_path: Path) -> None:
    """Answers taking 0.6 seconds each: the second ends at the total."""
    for archive in serve_archive():
        archive.add("uid://A001/X1/X2", "2019.1.00994.S", {})
        archive.delay = 0.6
        client = AlmaDataLinkClient(archive.base, timeout=1.0, cache_dir=tmp_path)
        started = time.monotonic()
        with pytest.raises(ArchiveUnavailable, match="did not answer within 1 second;"):
            client.fetch_manifest(parse_uid("uid://A001/X1/X2"))
        assert time.monotonic() - started < 1.5
        assert len(archive.requests) == 2


def test_a_compressed_reply_is_measured_unpacked(serve, tmp_path: Path) -> None:
    client = AlmaDataLinkClient(serve(gzip_bomb), timeout=5, cache_dir=tmp_path)
    with pytest.raises(
        ArchiveUnavailable, match="sent more than 16 MiB, so the reply was refused"
    ):
        client.fetch_manifest(parse_uid("uid://A001/X1/X2"))
