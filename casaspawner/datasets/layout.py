"""Find the MOUS directory of an ALMA product tree.

A MOUS directory is named ``member.uid___…``.

A dataset is given as the member directory itself, or as a directory that holds exactly one
member directory within five levels. That is usually a group, science-goal or project directory,
but any directory will do.

The directory given is opened once, following links on the way to it. Below it, symbolic links
are never followed; see ``tree``.
"""

from __future__ import annotations

import contextlib
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

from casaspawner.datasets.tree import Directory, listing, open_directory, subdirectory, walk
from casaspawner.errors import ResolutionError, shown

MEMBER_DIR = re.compile(r"member\.uid___A[0-9]{3}_X[0-9a-fA-F]+_X[0-9a-fA-F]+")
#: Subdirectories of an unpacked MOUS.
#:
#: A directory holding two of them is a MOUS under another name.
MOUS_SUBDIRS = ("script", "qa", "log", "calibration", "product")
_MAX_DEPTH = 5
_MAX_DIRS = 20000


def path_kind(path: Path) -> Literal["dir", "file", "missing"]:
    """Tell what ``path`` names, following symbolic links.

    Raises the ``OSError`` of a path that cannot be looked at, so the caller can word it. For
    example the path is too long, permission is denied, or links form a loop.
    """
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):
        # ValueError means a NUL in the path.
        return "missing"
    return "dir" if stat.S_ISDIR(mode) else "file"


@contextlib.contextmanager
def open_mous(path: Path, label: str | None = None) -> Iterator[Directory]:
    """Open the single MOUS directory at or below ``path``.

    Zero or several raise a ``ResolutionError``. Errors name the dataset as ``label``, how the user
    gave it. The default label is the path.
    """
    name = shown(str(path) if label is None else label)
    with contextlib.ExitStack() as stack:
        try:
            root = stack.enter_context(open_directory(path))
        except (OSError, ValueError) as exc:
            raise _not_a_directory(path, name, exc) from None
        if MEMBER_DIR.fullmatch(path.name) or _looks_like_mous(root):
            yield root
        else:
            yield stack.enter_context(_find_member(root, name))


def _not_a_directory(path: Path, name: str, exc: OSError | ValueError) -> ResolutionError:
    """Word the error for a dataset path that cannot be opened.

    The path could not be opened as a directory.
    """
    if isinstance(exc, NotADirectoryError):
        try:
            is_file = path_kind(path) == "file"
        except OSError:
            is_file = False
        if is_file:
            return ResolutionError(
                f"{name} is a file; give the dataset's directory (a member.uid___… directory)."
            )
    # ValueError means a NUL in the path.
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, ValueError)):
        return ResolutionError(
            f"{name} does not exist; give an ALMA dataset directory or an ALMA identifier."
        )
    return ResolutionError(
        f"{name} cannot be opened ({exc.strerror or exc}); "
        "give an ALMA dataset directory or an ALMA identifier."
    )


@contextlib.contextmanager
def _find_member(root: Directory, name: str) -> Iterator[Directory]:
    """Open the one member directory within ``_MAX_DEPTH`` levels below ``root``."""
    found: list[str] = []
    with contextlib.ExitStack() as stack:
        first: Directory | None = None
        dirs = stack.enter_context(
            contextlib.closing(
                walk(
                    root,
                    _MAX_DEPTH - 1,
                    lambda n: not MEMBER_DIR.fullmatch(n) and not n.startswith("."),
                )
            )
        )
        for visited, (directory, entries) in enumerate(dirs):
            if visited > _MAX_DIRS:
                break
            for entry, kind in entries:
                if kind != "dir" or not MEMBER_DIR.fullmatch(entry):
                    continue
                # Kept open, so the directory listed is the one read.
                if first is None:
                    first = stack.enter_context(subdirectory(directory, PurePosixPath(entry)))
                    # No longer a directory: passed over like any link.
                    if first is None:
                        continue
                found.append(entry)
        # A member is counted only once one could be opened.
        if first is None:
            raise ResolutionError(
                f"{name} holds no ALMA member.uid___… (MOUS) directory; "
                "give the directory of one ALMA dataset."
            )
        if len(found) > 1:
            names = ", ".join(sorted(found)[:10])
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            raise ResolutionError(
                f"{name} holds {len(found)} MOUS directories ({names}{more}); give one of them."
            )
        # Close the walk's directories. The member stays open.
        dirs.close()
        yield first


def _looks_like_mous(directory: Directory) -> bool:
    return sum(kind == "dir" and entry in MOUS_SUBDIRS for entry, kind in listing(directory)) >= 2
