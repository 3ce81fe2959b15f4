"""Resolutions kept by the hub while nothing they were read from has changed.

A resolution depends only on what the resolver looked at below the dataset directory: the
directories it opened and listed, the files it read (and the names it looked for and did not
find). The resolution worker records each of them, path and stamp — device, inode, type and
permissions, owner, size, modification and status-change times — as the resolution's
*footprint* (:class:`Recorder`, told by :data:`casaspawner.datasets.tree.OBSERVER`). When the
same directory is resolved again, :meth:`ResolutionCache.peek` opens the same paths the way the
resolver does (one directory at a time, never through a link) and compares: if every stamp is the
same, no directory gained, lost or renamed an entry and no file changed, so the resolution would
be the same, and the kept one is the answer. No worker is started.

A changed file has new stamps: writing changes its modification time, ``chmod``, ``chown``,
``rename`` and ``touch -d`` its status-change time, which no one can set back; a new file, a
removed or renamed one changes its directory's times. What is not kept:

* a resolution whose footprint has a stamp from less than ``settle`` seconds before its worker
  started: a file written twice within the file system's timestamp granularity (a clock tick)
  keeps its stamps, so only files older than that are trusted (git's "racy clean" rule);
* one during which a path showed two stamps, or an error that is not a fact of the tree (an I/O
  error, a stale handle: anything but a missing name, a link, a non-directory or a refusal);
* one that looked at more than :data:`MAX_FOOTPRINT` paths (checking it would cost more than the
  worker), and errors: only resolutions are kept.

The key is the dataset directory itself (device and inode, as the hub's reader opened it), its
name and the name the user gave it (both appear in the answer), the operator's catalog file (and
its stamp: the worker reads it anew) and the account the worker runs as; a kept resolution is
given only for the same catalog. Entries live in the hub's memory, at most ``size`` of them,
least recently used first out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from casaspawner.catalog.model import Catalog
from casaspawner.datasets import tree
from casaspawner.datasets.model import Resolution

#: Identity and change stamps of a path: device, inode, mode, uid, gid, size, mtime, ctime (ns).
Stamp = tuple[int, int, int, int, int, int, int, int]
#: What a resolution looked at: each path (relative to the dataset, ``.`` for it) and its stamp,
#: None when nothing was there.
Footprint = tuple[tuple[str, Stamp | None], ...]

#: The most paths a kept resolution may depend on.
#:
#: A dataset named by its MOUS or project directory costs 5 to 20.
MAX_FOOTPRINT = 256
#: Errors that say what the tree is, so a resolution that met them is still its tree's.
FACTS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
)

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SEARCH_ONLY = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def stamp(info: os.stat_result) -> Stamp:
    """The identity and change stamps of a ``stat`` result."""
    return (
        info.st_dev,
        info.st_ino,
        info.st_mode,
        info.st_uid,
        info.st_gid,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
    )


# In the worker
class Recorder:
    """Records a resolution's footprint, as :data:`tree.OBSERVER`."""

    def __init__(self) -> None:
        self.paths: dict[str, Stamp | None] = {}
        #: Why the footprint cannot be trusted, if it cannot.
        self.unsound: str | None = None

    def seen(self, path: PurePosixPath, info: os.stat_result | None) -> None:
        key, value = str(path), None if info is None else stamp(info)
        if self.paths.setdefault(key, value) != value:
            self.unsound = f"{key} changed while it was read"

    def failed(self, error: OSError) -> None:
        if error.errno not in FACTS:
            self.unsound = f"an error passed over ({error.strerror or error})"

    def footprint(self) -> list[list[Any]] | None:
        """The footprint as JSON can carry it; None when it cannot be trusted."""
        if self.unsound is not None or not 0 < len(self.paths) <= MAX_FOOTPRINT:
            return None
        return [
            [path, None if value is None else list(value)] for path, value in self.paths.items()
        ]


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record the footprint of the reading done inside."""
    recorder = Recorder()
    token = tree.OBSERVER.set(recorder)
    try:
        yield recorder
    finally:
        tree.OBSERVER.reset(token)


# In the hub
def parse_footprint(raw: object) -> Footprint | None:
    """A worker's footprint, checked; None for anything else.

    Every path is relative and below the dataset (no ``..``, no empty or absolute component),
    every stamp eight whole numbers, and every path's parent a directory of the footprint: so
    checking it walks only below the dataset, and misses no directory a lookup depended on.
    """
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_FOOTPRINT:
        return None
    paths: dict[str, Stamp | None] = {}
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return None
        path, value = item
        if path != "." and (
            "\x00" in path or any(part in ("", ".", "..") for part in path.split("/"))
        ):
            return None
        if value is not None and not (
            isinstance(value, list)
            and len(value) == 8
            and all(type(number) is int for number in value)
        ):
            return None
        paths[path] = None if value is None else _stamp_of(value)
    root = paths.get(".")
    if root is None or not stat.S_ISDIR(root[2]):
        return None
    for path in paths:
        if path == ".":
            continue
        parent = paths.get(_parent(path))
        if parent is None or not stat.S_ISDIR(parent[2]):
            return None
    return tuple(sorted(paths.items(), key=lambda entry: (entry[0].count("/"), entry[0])))


def settled(footprint: Footprint, started: float, settle: float) -> bool:
    """Whether every stamp is older than ``settle`` seconds before ``started`` (epoch seconds)."""
    limit = int((started - settle) * 1e9)
    return all(value is None or (value[6] < limit and value[7] < limit) for _, value in footprint)


def unchanged(root: int, footprint: Footprint) -> bool:
    """Whether every path of ``footprint`` below the open directory ``root`` still has its stamp.

    Directories are opened one at a time relative to their parent, never through a link; files
    are opened too (so a network file system revalidates what it cached), others only looked at.
    A path recorded as missing is covered by its directory's stamp.
    """
    opened: dict[str, int] = {".": root}
    try:
        for path, expected in footprint:
            if path == ".":
                if expected != stamp(os.fstat(root)):
                    return False
                continue
            if expected is None:
                continue
            parent = opened.get(_parent(path))
            if parent is None:
                return False
            name = path.rsplit("/", 1)[-1]
            mode = expected[2]
            if stat.S_ISDIR(mode):
                try:
                    fd = os.open(name, _DIRECTORY, dir_fd=parent)
                except PermissionError:
                    fd = os.open(name, _SEARCH_ONLY, dir_fd=parent)
                opened[path] = fd
                actual = os.fstat(fd)
            elif stat.S_ISREG(mode):
                try:
                    fd = os.open(name, _FILE, dir_fd=parent)
                except PermissionError:
                    actual = os.stat(name, dir_fd=parent, follow_symlinks=False)
                else:
                    try:
                        actual = os.fstat(fd)
                    finally:
                        os.close(fd)
            else:
                actual = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stamp(actual) != expected:
                return False
        return True
    except OSError:
        return False
    finally:
        for path, fd in opened.items():
            if path != ".":
                os.close(fd)


def _stamp_of(value: list[int]) -> Stamp:
    dev, ino, mode, uid, gid, size, mtime, ctime = value
    return (dev, ino, mode, uid, gid, size, mtime, ctime)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


@dataclass(frozen=True)
class Key:
    """What a kept resolution is for, besides its footprint."""

    #: Device and inode of the dataset directory.
    directory: tuple[int, int]
    #: Its name as the worker sees it, and the dataset's name as the user gave it.
    name: str
    label: str
    #: The operator's catalog file and its stamp; None for the bundled catalog.
    catalog_file: tuple[str, Stamp] | None
    #: The uid, gid and supplemental gids the worker runs as; None for the hub's own.
    user: tuple[int, int, tuple[int, ...]] | None


@dataclass(frozen=True)
class _Entry:
    footprint: Footprint
    resolution: Resolution
    catalog: Catalog


class ResolutionCache:
    """Resolutions by dataset directory, each valid while its footprint is unchanged.

    ``settle`` is how old (seconds) every stamp must be when the worker starts; see the module.
    Lookups run in threads, as they look at the storage; the entries are shared under a lock.
    """

    def __init__(self, size: int = 2048, settle: float = 2.0) -> None:
        self.size = size
        self.settle = settle
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        #: Lookups answered, and lookups not answered (nothing kept, or a change).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def key(
        self,
        directory: int,
        name: str,
        label: str,
        catalog_path: str | None = None,
        user: tuple[int, int, Sequence[int]] | None = None,
    ) -> Key:
        """The key of the open dataset directory ``directory`` as ``name`` and ``label``.

        Raises ``OSError`` when the directory or the catalog file cannot be looked at.
        """
        info = os.fstat(directory)
        catalog_file = None
        if catalog_path:
            catalog_file = (os.path.abspath(catalog_path), stamp(os.stat(catalog_path)))
        ids = None if user is None else (user[0], user[1], tuple(user[2]))
        return Key((info.st_dev, info.st_ino), name, label, catalog_file, ids)

    def peek(self, key: Key, directory: int, catalog: Catalog) -> Resolution | None:
        """The kept resolution of ``key`` if its footprint below ``directory`` is unchanged.

        Blocking, as it looks at the storage, which can be slow: for the hub's storage threads.
        """
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or not (entry.catalog is catalog or entry.catalog == catalog):
            with self._lock:
                self.misses += 1
            return None
        if not unchanged(directory, entry.footprint):
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
                self.misses += 1
            return None
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
            self.hits += 1
        resolution = entry.resolution
        if entry.catalog is not catalog:
            resolution = replace(resolution, release=catalog.get(resolution.release.id))
        return resolution

    def store(
        self,
        key: Key,
        footprint: object,
        started: float,
        resolution: Resolution,
        catalog: Catalog,
    ) -> bool:
        """Keep ``resolution`` if its worker's ``footprint`` can be trusted; whether it was kept.

        ``started`` is when the worker started (epoch seconds).
        """
        checked = parse_footprint(footprint)
        trusted = checked is not None and settled(checked, started, self.settle)
        with self._lock:
            if not trusted or checked is None:
                self._entries.pop(key, None)
                return False
            self._entries[key] = _Entry(checked, resolution, catalog)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return True


#: The hub's cache: one per process, shared by its spawners.
RESOLUTIONS = ResolutionCache()
