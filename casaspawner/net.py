"""Small network helpers: URL origins and free ports on this machine.

Standard library only: image builds run :mod:`casaspawner.tarballs` with this file beside it.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """Return the scheme, host and port a URL's requests go to.

    The scheme's default port is filled in when the URL gives none.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    # A port that is not a number is no origin to trust: fetching from it fails on its own.
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme)


def on_this_machine(host: str) -> bool:
    """Tell whether ``host`` names this machine.

    That is ``localhost`` or a loopback address.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_port(count: int = 1, host: str = "127.0.0.1") -> int:
    """Return the first of ``count`` consecutive TCP ports free on ``host``.

    The port P is such that P to P + count - 1 are free now.
    """
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = int(probe.getsockname()[1])
        if base + count <= 65000 and all(
            _free(port, host) for port in range(base + 1, base + count)
        ):
            return base
    raise OSError(f"No block of {count} free ports on {host}.")


def _free(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
