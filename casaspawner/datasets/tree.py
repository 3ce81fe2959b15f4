"""Reading below a dataset directory whose owner may change it while the hub reads it.

The dataset directory is opened once, by the path given (links on the way to it are followed, as the user
means them; the hub's storage reader has already walked that path without following links). Below it nothing
is checked and then opened again by name: every directory is opened relative to its parent's descriptor with
``O_DIRECTORY | O_NOFOLLOW``, every file with ``O_NOFOLLOW | O_NONBLOCK`` and then required by ``fstat`` to
be a regular file, and listings are read from the open directory (``os.scandir(fd)``). A symbolic link below
the dataset directory is passed over, whether it was there all along or swapped in a moment ago, so nothing
outside the dataset is ever read, with whatever rights the hub has.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

Kind = Literal["dir", "file", "link", "other"]
Listing = list[tuple[str, Kind]]

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: A directory the hub may search but not list (mode 0711, say) is still walked through, as by name.
_SEARCH_ONLY = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Opening a file name fails so when it is not (or no longer) what was listed: a link, gone, or below
#: something that is not a directory. Such a name is passed over; any other error is the caller's to word.
_PASSED_OVER = (errno.ELOOP, errno.ENOENT, errno.ENOTDIR)


@dataclass(frozen=True)
class Directory:
    """An open directory of a dataset: its descriptor, its path relative to the dataset directory the user
    gave (``.`` for that directory; evidence paths are reported this way) and its own name."""

    fd: int
    path: PurePosixPath
    name: str


@contextlib.contextmanager
def open_directory(path: Path) -> Iterator[Directory]:
    """The directory at ``path`` (links followed), open for reading below it. Raises the ``OSError`` of a path
    that cannot be opened as a directory (``ValueError`` for one with a NUL in it)."""
    fd = _open_dir(os.fspath(path), None, follow=True)
    try:
        yield Directory(fd, PurePosixPath("."), path.name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def subdirectory(base: Directory, path: PurePosixPath) -> Iterator[Directory | None]:
    """The directory ``path`` below ``base`` (``.``: ``base`` itself), each step opened relative to the one
    before without following a link; None when a step is a link, missing, not a directory or cannot be
    opened at all (nothing in it could be read)."""
    owned: int | None = None
    found = True
    try:
        for part in path.parts:
            try:
                if part == "..":  # never up and out (names come from listings, which hold no "..")
                    raise FileNotFoundError(part)
                child = _open_dir(part, base.fd if owned is None else owned)
            except OSError:
                found = False
                break
            _close(owned)
            owned = child
        fd = base.fd if owned is None else owned
        yield Directory(fd, base.path / path, path.name or base.name) if found else None
    finally:
        _close(owned)


@contextlib.contextmanager
def open_file(base: Directory, path: PurePosixPath) -> Iterator[BinaryIO | None]:
    """The regular file ``path`` below ``base``, opened without following a link at any step; None when a
    step is a link, missing or not a directory, or the file is not a regular one (a FIFO does not block).
    Other errors (no permission) raise their ``OSError``."""
    with subdirectory(base, path.parent) as parent:
        fd = None if parent is None else _open_regular(path.name, parent.fd)
        if fd is None:
            yield None
        else:
            with os.fdopen(fd, "rb") as handle:
                yield handle


def listing(directory: Directory, wanted: Callable[[str], object] | None = None) -> Listing:
    """The names in ``directory`` (those ``wanted``, default all) and what each is, links not followed; a
    directory that cannot be listed is empty."""
    try:
        with os.scandir(directory.fd) as entries:
            return [(e.name, _kind(e)) for e in entries if wanted is None or wanted(e.name)]
    except OSError:
        return []


def walk(
    top: Directory, depth: int, descend: Callable[[str], bool] = lambda name: True
) -> Generator[tuple[Directory, Listing], None, None]:
    """``top`` and the directories below it down to ``depth`` levels, each with its listing: ``top`` first,
    then each subdirectory's tree in listing order. Links are never entered; a subdirectory is entered only
    when ``descend(name)``. A directory is open while its tree is visited (close the generator when leaving
    early: ``contextlib.closing``)."""
    entries = listing(top)
    yield top, entries
    if depth <= 0:
        return
    for name, kind in entries:
        if kind == "dir" and descend(name):
            with subdirectory(top, PurePosixPath(name)) as child:
                if child is not None:
                    yield from walk(child, depth - 1, descend)


def _open_dir(name: str, dir_fd: int | None, *, follow: bool = False) -> int:
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        return os.open(name, _DIRECTORY | nofollow, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, _SEARCH_ONLY | nofollow, dir_fd=dir_fd)


def _open_regular(name: str, dir_fd: int) -> int | None:
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _PASSED_OVER:
            return None
        raise
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    return fd


def _kind(entry: os.DirEntry[str]) -> Kind:
    try:
        if entry.is_symlink():
            return "link"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
    except OSError:
        pass
    return "other"


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
