"""CASA release tarballs: which checksum proves a download, checking it, and (in image builds) fetch + unpack.

One policy for local environments and images alike: the catalog's SHA-256 when it pins one, else the MD5
that NRAO publishes next to every tarball (``<tarball URL>.md5``); a tarball with neither is refused, and
so is one that does not match.

Standard library only: image builds copy this file into the build context and run it inside the build
container as ``python3 tarballs.py URL ALGORITHM:HEX DEST`` (download, verify, unpack the tarball's single
top-level directory to ``DEST``; exit status 1 with one sentence on stderr for any problem).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

ALGORITHMS = {"sha256": 64, "md5": 32}
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A tarball cannot be verified, or does not match; ``str()`` is one sentence."""


def expected_checksum(url: str, sha256: str | None, timeout: float = 30) -> tuple[str, str]:
    """``(algorithm, hex)`` that ``url`` must match: ``sha256`` when given, else the published ``url.md5``."""
    if sha256:
        return "sha256", sha256.lower()
    name = url.rstrip("/").rsplit("/", 1)[-1]
    try:
        with urllib.request.urlopen(url + ".md5", timeout=timeout) as response:  # noqa: S310 (http(s) only)
            text = response.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as error:
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
