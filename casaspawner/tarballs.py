"""Verifying CASA release tarballs, and fetching and unpacking them in image builds.

One policy serves local environments and images alike. When the catalog pins a SHA-256, that
checksum always wins. Otherwise the MD5 that NRAO publishes next to every tarball is used:
``<tarball URL>.md5``, from the tarball's own origin, so through a mirror it is the mirror's.

That fallback is taken only where the ``.md5`` cannot be replaced on the way: over https, or over
plain http from this machine (a loopback mirror). Its request may not be redirected to another
origin. A tarball that cannot be verified is refused, and so is one that does not match.

The fallback proves a download is the file its origin publishes, with no corruption and no
tampering in transit. It does not protect against the origin itself, since a compromised server or
mirror can publish a matching pair. Nor does it protect against an MD5 collision. Only a pinned
SHA-256 does.

This module and :mod:`casaspawner.net` use the standard library only. Image builds copy both into
the build context and run this one inside the build container as
``python3 tarballs.py URL ALGORITHM:HEX DEST``. It downloads
and verifies the tarball, then unpacks the tarball's single top-level directory to ``DEST``. Any
problem gives exit status 1 with one sentence on stderr.
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
from pathlib import Path
from typing import IO, Any

# An image build stage runs this file alone, with net.py beside it.
try:
    from casaspawner.net import on_this_machine, origin
except ImportError:
    from net import on_this_machine, origin  # type: ignore[no-redef]

ALGORITHMS = {"sha256": 64, "md5": 32}
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A tarball cannot be verified, or does not match its checksum.

    ``str()`` is one sentence.
    """


def unverifiable(url: str, sha256: str | None) -> str | None:
    """Return why a download of ``url`` could not be verified.

    None means it can be verified.

    This is decided without fetching anything. A pinned ``sha256`` always verifies, over any
    scheme, because the checksum itself is trusted. Without one, the published ``url.md5`` is
    trusted only over https, or over http from a loopback address.
    """
    scheme, host, _ = origin(url)
    if sha256 or scheme == "https" or (scheme == "http" and on_this_machine(host)):
        return None
    return (
        "the catalog has no SHA-256, and an MD5 counts only over https or from this machine, "
        f"not {url}.md5"
    )


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follows a redirect of the ``.md5`` request only within the tarball's origin."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if origin(newurl) != origin(req.full_url):
            raise ChecksumError(f"{req.full_url} redirects to another origin ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def expected_checksum(url: str, sha256: str | None, timeout: float = 30) -> tuple[str, str]:
    """Return the ``(algorithm, hex)`` checksum that ``url`` must match.

    That is ``sha256`` when given, else the published ``url.md5``. See :func:`unverifiable` for
    where the published checksum is trusted.
    """
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
    """Split ``"sha256:<hex>"`` or ``"md5:<hex>"`` into ``(algorithm, hex)``."""
    algorithm, _, value = text.strip().partition(":")
    value = value.lower()
    if ALGORITHMS.get(algorithm) != len(value) or any(c not in "0123456789abcdef" for c in value):
        raise ChecksumError(
            f"{text!r} is not a SHA-256 or MD5 checksum (sha256:<hex> or md5:<hex>)."
        )
    return algorithm, value


def verify_file(path: Path, algorithm: str, expected: str) -> None:
    """Refuse ``path`` unless its ``algorithm`` digest is ``expected``."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ChecksumError(f"{path.name} does not match its {algorithm.upper()} checksum.")


# Image builds, which run this module as a script.


def fetch_verify_unpack(url: str, checksum: str, dest: Path) -> None:
    """Download ``url``, verify it against ``checksum`` and unpack its top directory.

    ``checksum`` is ``algorithm:hex``.
    """
    algorithm, expected = parse_checksum(checksum)
    if not url.startswith(("https://", "http://")):
        raise ChecksumError(f"{url} is not an http(s) URL.")
    problem = unverifiable(url, expected if algorithm == "sha256" else None)
    # An MD5 is only worth what the .md5 it came from was, and the URL decides that.
    if problem:
        raise ChecksumError(f"{url.rstrip('/').rsplit('/', 1)[-1]} cannot be verified: {problem}.")
    temporary = os.environ.get("TMPDIR", "/tmp")  # noqa: S108
    work = Path(tempfile.mkdtemp(prefix="casa-tarball-", dir=temporary))
    try:
        tarball = work / url.rstrip("/").rsplit("/", 1)[-1]
        try:
            response = urllib.request.urlopen(url, timeout=120)  # noqa: S310
            with response, tarball.open("wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
        except (urllib.error.URLError, OSError) as error:
            raise ChecksumError(
                f"could not download {url}: {getattr(error, 'reason', error)}."
            ) from None
        verify_file(tarball, algorithm, expected)
        print(f"verified {tarball.name} ({algorithm} {expected})")
        staging = work / "unpacked"
        staging.mkdir()
        result = subprocess.run(
            [
                "tar",
                "-x",
                "-f",
                str(tarball),
                "-C",
                str(staging),
                "--no-same-owner",
                "--no-same-permissions",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ChecksumError(
                f"{tarball.name} is not a readable tarball: {result.stderr.strip()}."
            )
        tops = list(staging.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise ChecksumError(
                f"{tarball.name} must hold exactly one top-level directory, not {len(tops)}."
            )
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
