"""The ``images`` tier's build command and the names it builds."""

from __future__ import annotations

import subprocess
import sys
import time

REGISTRY = "localhost/casaspawner"
MODULAR = "casa-6.6.5-31"
#: Measures data for the tests, mounted read-only like the shared volume.
CASADATA = "casadata==2025.9.22"
#: Its AppImage goes into the stand-in monolithic tarball.
PLOTMS = "casaplotms==2.5.2"


def images_cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """``casaspawner images ARGS`` in a subprocess, as an operator (or make) runs it."""
    return subprocess.run(
        [sys.executable, "-m", "casaspawner.images", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = images_cli("build", "--base", "local", *args)
    return result, time.monotonic() - started
