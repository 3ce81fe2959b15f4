"""Download a CASA release tarball, refuse it unless its SHA-256 matches, and unpack it to one directory.

Usage (build time, inside the image): ``python3 fetch_verify.py URL SHA256 DEST``. The tarball's single
top-level directory (e.g. ``casa-6.6.1-17-pipeline-2024.1.0.8``) becomes ``DEST``. Exit status 1 with one
sentence on stderr for any problem, so a bad download fails the image build with a clear message.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


def fail(message: str) -> None:
    print(f"casaspawner: {message}", file=sys.stderr)
    sys.exit(1)


def fetch(url: str, out: Path) -> str:
    if not url.startswith(("https://", "http://", "file:/")):
        fail(f"{url} is not an http(s) or file URL.")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as response, out.open("wb") as f:  # noqa: S310 (checked)
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                f.write(chunk)
    except OSError as exc:
        fail(f"could not download {url}: {exc}.")
    return digest.hexdigest()


def main(url: str, sha256: str, dest: str) -> None:
    expected = sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        fail(f"no valid SHA-256 was given for {url}; refusing to install an unverified CASA tarball.")
    target = Path(dest)
    work = Path(tempfile.mkdtemp(prefix="casa-tarball-", dir=os.environ.get("TMPDIR", "/tmp")))  # noqa: S108
    try:
        tarball = work / url.rstrip("/").rsplit("/", 1)[-1]
        actual = fetch(url, tarball)
        if actual != expected:
            fail(
                f"checksum mismatch for {tarball.name}: expected {expected}, got {actual}; "
                "refusing to install it."
            )
        print(f"verified {tarball.name} sha256 {actual}")
        staging = work / "unpacked"
        staging.mkdir()
        result = subprocess.run(
            ["tar", "-x", "-f", str(tarball), "-C", str(staging), "--no-same-owner", "--no-same-permissions"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            fail(f"{tarball.name} is not a readable tarball: {result.stderr.strip()}.")
        tops = list(staging.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            fail(f"{tarball.name} must contain exactly one top-level directory, not {len(tops)} entries.")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tops[0]), str(target))
        print(f"unpacked {tops[0].name} to {target}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        fail("usage: fetch_verify.py URL SHA256 DEST.")
    main(*sys.argv[1:])
