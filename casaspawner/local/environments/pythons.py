"""Find a Python interpreter of a given version.

It is looked for on PATH, in pyenv, or through uv.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
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
            out = subprocess.run(
                [pyenv, "root"], capture_output=True, text=True, timeout=10, check=True
            )
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
            [uv, "python", "find", "--no-project", version],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return Path(text) if out.returncode == 0 and text else None


def world_usable(path: str | os.PathLike[str]) -> bool:
    """Whether every user can reach and read ``path``.

    All its parent directories must be searchable by others.
    """
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def candidates(version: str, path: str | None = None) -> Iterator[Path]:
    """Find interpreters that claim to be Python ``version``, best first.

    ``version`` is like ``"3.11"``. The search order is PATH, pyenv, then uv.
    """
    search = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    for directory in [*search, "/usr/local/bin", "/usr/bin"]:
        found = shutil.which(f"python{version}", path=directory) if directory else None
        if found:
            yield Path(found)
    root = _pyenv_root()
    if root is not None:
        for match in sorted(
            glob.glob(str(root / "versions" / f"{version}*" / "bin" / f"python{version}"))
        ):
            yield Path(match)
    uv = _uv_python(version)
    if uv is not None:
        yield uv


def _works(python: Path, version: str, shared: bool) -> Path | None:
    """Check that ``python`` runs, is ``version`` and can make venvs.

    Returns the real interpreter, or None. With ``shared``, every user must be able to run it too:
    a pyenv under a private home cannot serve sessions of other users.
    """
    probe = (
        "import os, sys, venv, ensurepip; "
        "print('%d.%d' % sys.version_info[:2]); print(os.path.realpath(sys.executable)); "
        "print(sys.base_prefix)"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split("\n")
    if out.returncode != 0 or len(lines) < 3 or lines[0] != version:
        return None
    if shared and not (world_usable(lines[1]) and world_usable(lines[2])):
        return None
    return Path(lines[1])


def find_python(
    versions: Iterable[str], path: str | None = None, *, shared: bool = False
) -> tuple[Path, str] | None:
    """Find the first working interpreter among ``versions``, newest first.

    Returns the interpreter and its version, or None. With ``shared``, only interpreters every
    user can run count: the hub runs as root, and sessions as other users.
    """
    ordered = sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)
    for version in ordered:
        seen: set[Path] = set()
        for python in candidates(version, path):
            if python in seen:
                continue
            seen.add(python)
            real = _works(python, version, shared)
            if real is not None:
                return real, version
    return None
