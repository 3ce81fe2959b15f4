"""Find a Python interpreter of a given version: on PATH, in pyenv, or through uv."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path


def _pyenv_root() -> Path | None:
    root = os.environ.get("PYENV_ROOT")
    if root:
        return Path(root)
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            out = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=10, check=True)
            return Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            return None
    default = Path.home() / ".pyenv"
    return default if default.is_dir() else None


def _uv_python(version: str) -> Path | None:
    uv = shutil.which("uv")
    if not uv:
        return None
    try:
        out = subprocess.run(
            [uv, "python", "find", "--no-project", version], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return Path(text) if out.returncode == 0 and text else None


def candidates(version: str, path: str | None = None) -> Iterator[Path]:
    """Interpreters that claim to be Python ``version`` ("3.11"), best first."""
    found = shutil.which(f"python{version}", path=path)
    if found:
        yield Path(found)
    root = _pyenv_root()
    if root is not None:
        for match in sorted(glob.glob(str(root / "versions" / f"{version}*" / "bin" / f"python{version}"))):
            yield Path(match)
    uv = _uv_python(version)
    if uv is not None:
        yield uv


def _works(python: Path, version: str) -> bool:
    """The interpreter runs, is the version asked for, and can make virtual environments."""
    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def find_python(versions: Iterable[str], path: str | None = None) -> tuple[Path, str] | None:
    """The first working interpreter among ``versions`` (newest first), with its version, or None."""
    ordered = sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)
    for version in ordered:
        for python in candidates(version, path):
            if _works(python, version):
                return python, version
    return None
