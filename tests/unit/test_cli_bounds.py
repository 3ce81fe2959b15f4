"""Command-line values are bounded: one sentence and exit 2, never a hang or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "casaspawner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e9", "ten"])
def test_a_timeout_must_be_a_finite_positive_number(value: str) -> None:
    result = run("resolve", "uid://A001/X1/X2", f"--timeout={value}")
    assert result.returncode == 2
    assert result.stderr.endswith("give a number above 0, at most 86400\n")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("kind", ["fifo", "device", "large"])
def test_a_catalog_must_be_a_regular_file_within_a_size_limit(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.write_bytes(b"# " + b"x" * (5 << 20))
    result = run("catalog", "--catalog", str(path), timeout=20)
    assert result.returncode == 2
    assert "is not a regular file of at most 4 MiB." in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_long_catalog_path_is_shortened_in_the_sentence(tmp_path: Path) -> None:
    result = run("catalog", "--catalog", str(tmp_path / ("x" * 100_000)))
    assert result.returncode == 2 and len(result.stderr) < 500
