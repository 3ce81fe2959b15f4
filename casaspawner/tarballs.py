"""CASA release tarballs: which checksum proves a download, checking it, and (in image builds) fetch + unpack.

One policy for local environments and images alike: the catalog's SHA-256 when it pins one (it always
wins), else the MD5 that NRAO publishes next to every tarball (``<tarball URL>.md5``, from the tarball's own
origin, so through a mirror it is the mirror's). That fallback is taken only where the ``.md5`` cannot be
replaced on the way: over https, or over plain http from this machine (a loopback mirror); its request may
not be redirected to another origin. A tarball that cannot be verified is refused, and so is one that does
not match. The fallback proves a download is the file its origin publishes (no corruption, no tampering in
transit); it does not protect against the origin itself (a compromised server or mirror can publish a
matching pair) or an MD5 collision: only a pinned SHA-256 does.

Standard library only: image builds copy this file into the build context and run it inside the build
container as ``python3 tarballs.py URL ALGORITHM:HEX DEST`` (download, verify, unpack the tarball's single
top-level directory to ``DEST``; exit status 1 with one sentence on stderr for any problem).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from ipaddress import ip_address
from pathlib import Path
from typing import IO, Any

ALGORITHMS = {"sha256": 64, "md5": 32}
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A tarball cannot be verified, or does not match; ``str()`` is one sentence."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a number: no origin to trust; fetching it fails with its own sentence
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _on_this_machine(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def unverifiable(url: str, sha256: str | None) -> str | None:
    """Why a download of ``url`` could not be verified, decided without fetching anything; None if it can.

    A pinned ``sha256`` always verifies (any scheme: the checksum itself is trusted). Without one, the
    published ``url.md5`` is trusted only over https, or over http from a loopback address."""
    scheme, host, _ = _origin(url)
    if sha256 or scheme == "https" or (scheme == "http" and _on_this_machine(host)):
        return None
    return (
        f"the catalog has no SHA-256, and an MD5 counts only over https or from this machine, not {url}.md5"
    )


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follows a redirect of the ``.md5`` request only within the tarball's origin."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            raise ChecksumError(f"{req.full_url} redirects to another origin ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def expected_checksum(url: str, sha256: str | None, timeout: float = 30) -> tuple[str, str]:
    """``(algorithm, hex)`` that ``url`` must match: ``sha256`` when given, else the published ``url.md5``
    (see :func:`unverifiable` for where that is trusted)."""
    if sha256:
        return "sha256", sha256.lower()
    name = url.rstrip("/").rsplit("/", 1)[-1]
    problem = unverifiable(url, sha256)
    if problem:
        raise ChecksumError(f"{name} cannot be verified: {problem}.")
    opener = urllib.request.build_opener(_SameOrigin)
    try:
        with opener.open(url + ".md5", timeout=timeout) as response:
            text = response.read(4096).decode(errors="replace")
    except ChecksumError as error:
        raise ChecksumError(f"{name} cannot be verified: {error}.") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        raise ChecksumError(
            f"{name} cannot be verified: the catalog has no SHA-256 and {url}.md5 is unreachable "
            f"({getattr(error, 'reason', error)})."
        ) from None
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not match:
        raise ChecksumError(f"{url}.md5 does not contain an MD5 checksum.")
    return "md5", match.group(0).lower()


def parse_checksum(text: str) -> tuple[str, str]:
    """``"sha256:<hex>"`` or ``"md5:<hex>"`` → ``(algorithm, hex)``."""
    algorithm, _, value = text.strip().partition(":")
    value = value.lower()
    if ALGORITHMS.get(algorithm) != len(value) or any(c not in "0123456789abcdef" for c in value):
        raise ChecksumError(f"{text!r} is not a SHA-256 or MD5 checksum (sha256:<hex> or md5:<hex>).")
    return algorithm, value


def verify_file(path: Path, algorithm: str, expected: str) -> None:
    """Refuse ``path`` unless its ``algorithm`` digest is ``expected``."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ChecksumError(f"{path.name} does not match its {algorithm.upper()} checksum.")


# ------------------------------------------------------------------------- image builds (run as a script)


def fetch_verify_unpack(url: str, checksum: str, dest: Path) -> None:
    """Download ``url``, verify it against ``checksum`` (``algorithm:hex``) and unpack its top directory."""
    algorithm, expected = parse_checksum(checksum)
    if not url.startswith(("https://", "http://")):
        raise ChecksumError(f"{url} is not an http(s) URL.")
    problem = unverifiable(url, expected if algorithm == "sha256" else None)
    if problem:  # an MD5 is only worth what the .md5 it came from was, and that is decided by the URL
        raise ChecksumError(f"{url.rstrip('/').rsplit('/', 1)[-1]} cannot be verified: {problem}.")
    work = Path(tempfile.mkdtemp(prefix="casa-tarball-", dir=os.environ.get("TMPDIR", "/tmp")))  # noqa: S108
    try:
        tarball = work / url.rstrip("/").rsplit("/", 1)[-1]
        try:
            with urllib.request.urlopen(url, timeout=120) as response, tarball.open("wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out, _CHUNK)
        except (urllib.error.URLError, OSError) as error:
            raise ChecksumError(f"could not download {url}: {getattr(error, 'reason', error)}.") from None
        verify_file(tarball, algorithm, expected)
        print(f"verified {tarball.name} ({algorithm} {expected})")
        staging = work / "unpacked"
        staging.mkdir()
        result = subprocess.run(
            ["tar", "-x", "-f", str(tarball), "-C", str(staging), "--no-same-owner", "--no-same-permissions"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ChecksumError(f"{tarball.name} is not a readable tarball: {result.stderr.strip()}.")
        tops = list(staging.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise ChecksumError(f"{tarball.name} must hold exactly one top-level directory, not {len(tops)}.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tops[0]), str(dest))
        print(f"unpacked {tops[0].name} to {dest}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("casaspawner: usage: tarballs.py URL ALGORITHM:HEX DEST.", file=sys.stderr)
        return 1
    try:
        fetch_verify_unpack(argv[0], argv[1], Path(argv[2]))
    except ChecksumError as error:
        print(f"casaspawner: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
