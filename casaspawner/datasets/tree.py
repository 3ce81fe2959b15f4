"""Read below a dataset directory that its owner may change.

The owner may change it while the hub reads it.

The dataset directory is opened once, by the path given. Links on the way to it are followed, as
the user means them. The hub's storage reader has already walked that path without following
links.

Below it, nothing is checked and then opened again by name:

* every directory is opened relative to its parent's descriptor with
  ``O_DIRECTORY | O_NOFOLLOW``;
* every file is opened with ``O_NOFOLLOW | O_NONBLOCK``, and ``fstat`` must then show a regular
  file;
* listings are read from the open directory, with ``os.scandir(fd)``.

A symbolic link below the dataset directory is passed over, whether it was there all along or
swapped in a moment ago. So nothing outside the dataset is ever read, with whatever rights the hub
has.

An :class:`Observer` in :data:`OBSERVER` is told of every directory and file looked at, and of
every error passed over; the resolution worker records so what a resolution depends on
(:mod:`casaspawner.datasets.cache`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Callable, Generator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Kind = Literal["dir", "file", "link", "other"]
Listing = list[tuple[str, Kind]]

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Flags for a directory the hub may search but not list, mode 0711 say.
#:
#: Such a directory is still walked through, as by name.
_SEARCH_ONLY = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: How opening a name fails when it is not, or no longer, what was listed.
#:
#: The name is then a link, gone, or below something that is not a directory. Such a name is passed
#: over. Any other error is the caller's to word.
_PASSED_OVER = (errno.ELOOP, errno.ENOENT, errno.ENOTDIR)


class Observer(Protocol):
    """Told of what reading below a dataset looks at."""

    def seen(self, path: PurePosixPath, info: os.stat_result | None) -> None:
        """``path`` (relative to the dataset) was looked at, and was this; None: nothing there."""

    def failed(self, error: OSError) -> None:
        """An error was passed over (or raised to the reader)."""


#: The observer of the reading in this context, if any.
OBSERVER: ContextVar[Observer | None] = ContextVar("casaspawner_tree_observer", default=None)


@dataclass(frozen=True)
class Directory:
    """An open directory of a dataset.

    It holds the descriptor, the path and the directory's own name. The path is relative to the
    dataset directory the user gave, and ``.`` for that directory. Evidence paths are reported this
    way.
    """

    fd: int
    path: PurePosixPath
    name: str


@contextlib.contextmanager
def open_directory(path: Path) -> Iterator[Directory]:
    """Open the directory at ``path`` for reading below it, following links.

    Raises the ``OSError`` of a path that cannot be opened as a directory, or ``ValueError`` for
    one with a NUL in it.
    """
    fd = _open_dir(os.fspath(path), None, follow=True)
    try:
        _seen(PurePosixPath("."), fd)
        yield Directory(fd, PurePosixPath("."), path.name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def subdirectory(base: Directory, path: PurePosixPath) -> Iterator[Directory | None]:
    """Open the directory ``path`` below ``base``, never following a link.

    A ``path`` of ``.`` is ``base`` itself. Each step is opened relative to the one before. Yields
    None when a step is a link, missing or not a directory. It is also None when a step cannot be
    opened at all, since nothing in it could be read.
    """
    owned: int | None = None
    found = True
    step = base.path
    try:
        for part in path.parts:
            step = step / part
            try:
                # Never up and out. Names come from listings, which hold no "..".
                if part == "..":
                    raise FileNotFoundError(part)
                child = _open_dir(part, base.fd if owned is None else owned)
            except OSError as exc:
                _missed(step, part, base.fd if owned is None else owned, exc)
                found = False
                break
            close(owned)
            owned = child
            _seen(step, child)
        fd = base.fd if owned is None else owned
        yield Directory(fd, base.path / path, path.name or base.name) if found else None
    finally:
        close(owned)


@contextlib.contextmanager
def open_file(base: Directory, path: PurePosixPath) -> Iterator[BinaryIO | None]:
    """Open the regular file ``path`` below ``base``, never following a link.

    Yields None when a step is a link, missing or not a directory, or when the file is not a
    regular one. A FIFO does not block. Other errors, such as a denied permission, raise their
    ``OSError``.
    """
    with subdirectory(base, path.parent) as parent:
        fd = None if parent is None else _open_regular(path.name, parent.fd, base.path / path)
        if fd is None:
            yield None
        elif OBSERVER.get() is None:
            with os.fdopen(fd, "rb") as handle:
                yield handle
        else:
            with _ObservedReader(io.FileIO(fd, "rb")) as observed:
                yield observed


def listing(directory: Directory, wanted: Callable[[str], object] | None = None) -> Listing:
    """List the names in ``directory`` and what each is, not following links.

    Only names ``wanted`` are listed, by default all. A directory that cannot be listed is empty.
    """
    _seen(directory.path, directory.fd)
    try:
        with os.scandir(directory.fd) as entries:
            return [(e.name, _kind(e)) for e in entries if wanted is None or wanted(e.name)]
    except OSError as exc:
        _failed(exc)
        return []


def walk(
    top: Directory, depth: int, descend: Callable[[str], bool] = lambda name: True
) -> Generator[tuple[Directory, Listing], None, None]:
    """Walk ``top`` and the directories below it down to ``depth`` levels.

    Each directory comes with its listing: ``top`` first, then each subdirectory's tree in listing
    order. Links are never entered. A subdirectory is entered only when ``descend(name)`` is true.

    A directory is open while its tree is visited. Close the generator when leaving early, e.g.
    with ``contextlib.closing``.
    """
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


def _open_regular(name: str, dir_fd: int, path: PurePosixPath) -> int | None:
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError as exc:
        _missed(path, name, dir_fd, exc)
        if exc.errno in _PASSED_OVER:
            return None
        raise
    try:
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
    except OSError as exc:
        _failed(exc)
        regular = False
    if not regular:
        os.close(fd)
        return None
    observer = OBSERVER.get()
    if observer is not None:
        observer.seen(path, info)
    return fd


def _seen(path: PurePosixPath, fd: int) -> None:
    """Tell the observer, if any, what the open ``fd`` at ``path`` is."""
    observer = OBSERVER.get()
    if observer is not None:
        try:
            observer.seen(path, os.fstat(fd))
        except OSError as exc:
            observer.failed(exc)


def _missed(path: PurePosixPath, name: str, dir_fd: int, error: OSError) -> None:
    """Tell the observer, if any, that ``name`` could not be opened, and what is there instead."""
    observer = OBSERVER.get()
    if observer is None:
        return
    observer.failed(error)
    try:
        info: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        observer.failed(exc)
        return
    observer.seen(path, info)


def _failed(error: OSError) -> None:
    observer = OBSERVER.get()
    if observer is not None:
        observer.failed(error)


class _ObservedReader(io.BufferedReader):
    """A file's reader that tells the observer of a read that failed."""

    def read(self, size: int | None = -1, /) -> bytes:
        try:
            return super().read(size)
        except OSError as exc:
            _failed(exc)
            raise

    def read1(self, size: int = -1, /) -> bytes:
        try:
            return super().read1(size)
        except OSError as exc:
            _failed(exc)
            raise

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        try:
            return super().readinto(buffer)
        except OSError as exc:
            _failed(exc)
            raise


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


def close(fd: int | None) -> None:
    """Close ``fd`` unless it is None."""
    if fd is not None:
        os.close(fd)
