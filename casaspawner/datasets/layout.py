"""Find the MOUS (``member.uid___…``) directory of an ALMA product tree.

A dataset is given as the member directory itself, or as a group / science-goal / project directory (or any
directory) that holds exactly one member directory within four levels. Symbolic links are not followed
while searching.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from casaspawner.errors import ResolutionError

MEMBER_DIR = re.compile(r"member\.uid___A[0-9]{3}_X[0-9a-fA-F]+_X[0-9a-fA-F]+")
#: Subdirectories of an unpacked MOUS; a directory holding two of them is a MOUS under another name.
MOUS_SUBDIRS = ("script", "qa", "log", "calibration", "product")
_MAX_DEPTH = 5
_MAX_DIRS = 20000


def find_mous(path: Path) -> Path:
    """The single MOUS directory at or below ``path``; zero or several is a ``ResolutionError``."""
    if not path.is_dir():
        if path.exists():
            raise ResolutionError(
                f"{path} is a file; give the dataset's directory (a member.uid___… directory)."
            )
        raise ResolutionError(f"{path} does not exist; give an ALMA dataset directory or an ALMA identifier.")
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
            f"{path} holds no ALMA member.uid___… (MOUS) directory; give the directory of one ALMA dataset."
        )
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p in found)[:10])
        more = f" and {len(found) - 10} more" if len(found) > 10 else ""
        raise ResolutionError(
            f"{path} holds {len(found)} MOUS directories ({names}{more}); give one of them."
        )
    return found[0]


def _looks_like_mous(path: Path) -> bool:
    return sum((path / name).is_dir() for name in MOUS_SUBDIRS) >= 2
