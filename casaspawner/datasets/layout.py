"""Find the MOUS (``member.uid___…``) directory of an ALMA product tree.

A dataset is given as the member directory itself, or as a group / science-goal / project directory (or any
directory) that holds exactly one member directory within four levels. Symbolic links are not followed
while searching.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Literal

from casaspawner.errors import ResolutionError, shown

MEMBER_DIR = re.compile(r"member\.uid___A[0-9]{3}_X[0-9a-fA-F]+_X[0-9a-fA-F]+")
#: Subdirectories of an unpacked MOUS; a directory holding two of them is a MOUS under another name.
MOUS_SUBDIRS = ("script", "qa", "log", "calibration", "product")
_MAX_DEPTH = 5
_MAX_DIRS = 20000


def path_kind(path: Path) -> Literal["dir", "file", "missing"]:
    """What ``path`` names, following symbolic links. Raises the ``OSError`` of a path that cannot be
    looked at (too long, no permission, a loop of links) so the caller can word it."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the path
        return "missing"
    return "dir" if stat.S_ISDIR(mode) else "file"


def find_mous(path: Path, label: str | None = None) -> Path:
    """The single MOUS directory at or below ``path``; zero or several is a ``ResolutionError``.

    Errors name the dataset as ``label`` (how the user gave it; default: the path).
    """
    name = shown(str(path) if label is None else label)
    try:
        kind = path_kind(path)
    except OSError as exc:
        raise ResolutionError(
            f"{name} cannot be opened ({exc.strerror or exc}); give an ALMA dataset directory or an ALMA identifier."
        ) from None
    if kind == "file":
        raise ResolutionError(f"{name} is a file; give the dataset's directory (a member.uid___… directory).")
    if kind == "missing":
        raise ResolutionError(f"{name} does not exist; give an ALMA dataset directory or an ALMA identifier.")
    if MEMBER_DIR.fullmatch(path.name) or _looks_like_mous(path):
        return path
    found: list[Path] = []
    base_depth = len(path.parts)
    for visited, (dirpath, dirnames, _) in enumerate(os.walk(path, followlinks=False)):
        if visited > _MAX_DIRS:
            break
        here = Path(dirpath)
        members = [name for name in dirnames if MEMBER_DIR.fullmatch(name)]
        found.extend(here / name for name in members)
        # do not descend into member directories or beyond the product-tree depth
        dirnames[:] = [
            name
            for name in dirnames
            if name not in members
            and not name.startswith(".")
            and len(here.parts) - base_depth < _MAX_DEPTH - 1
        ]
    if not found:
        raise ResolutionError(
            f"{name} holds no ALMA member.uid___… (MOUS) directory; give the directory of one ALMA dataset."
        )
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p in found)[:10])
        more = f" and {len(found) - 10} more" if len(found) > 10 else ""
        raise ResolutionError(
            f"{name} holds {len(found)} MOUS directories ({names}{more}); give one of them."
        )
    return found[0]


def _looks_like_mous(path: Path) -> bool:
    return sum(_is_dir(path / name) for name in MOUS_SUBDIRS) >= 2


def _is_dir(path: Path) -> bool:
    try:
        return path_kind(path) == "dir"
    except OSError:
        return False
