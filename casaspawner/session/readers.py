"""How the hub reads a dataset the user named by a path.

The module is pure and free of JupyterHub. A path the user types is mapped to the storage root
with the same templates the session's mounts use, by :func:`locate_in_storage`. The path may be
absolute, such as ``/arc/home/alice/…``, start with ``~/…``, or be relative to the home. A
*dataset reader* then gives the resolver a local directory to read:

* :class:`StorageMountReader` reads a read-only mount of the whole storage on the hub, set by
  ``storage_hub_path``.
* :class:`~casaspawner.session.vospace.VOSpaceReader` reads a VOSpace 2 service with the user's
  token, set by ``vospace_url``.
* :class:`LocalDirectoryReader` reads any directory on this machine, for the
  ``casaspawner pod`` dry run.

Anything with the same ``open`` as :class:`DatasetReader` plugs in as ``dataset_reader``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import functools
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

from casaspawner.datasets.storage import STORAGE
from casaspawner.datasets.tree import close as _close
from casaspawner.errors import InvalidInput, NoSuchDataset, shown
from casaspawner.plan import Identity, StorageLayout

T = TypeVar("T")
R = TypeVar("R")


class DatasetReader(Protocol):
    """Gives the hub read access to a dataset named by path.

    The user names the dataset by its path in the session's storage. ``open`` is an async
    context manager yielding a local directory the resolver may read. It raises
    ``InvalidInput``, one sentence, for paths outside the user's storage.
    """

    def open(
        self, text: str, identity: Identity
    ) -> contextlib.AbstractAsyncContextManager[Path]: ...


@dataclasses.dataclass(frozen=True)
class StorageRoot:
    """One place a session sees storage.

    ``mount`` in the session is ``sub_path`` of the storage root.
    """

    mount: str
    sub_path: str


def storage_roots(identity: Identity, layout: StorageLayout) -> list[StorageRoot]:
    """List the user's home and project directories, in the session and in storage."""
    roots = [
        StorageRoot(
            layout.home_mount.format(username=identity.username),
            layout.home_subpath.format(username=identity.username),
        )
    ]
    roots += [
        StorageRoot(layout.project_mount.format(group=g), layout.project_subpath.format(group=g))
        for g in identity.groups
    ]
    return roots


def locate_in_storage(
    text: str, identity: Identity, layout: StorageLayout
) -> tuple[StorageRoot, PurePosixPath]:
    """Map a path the user typed to its storage root and relative path.

    Pure: it never touches the file system. Accepted are an absolute path under the session's
    home or project mounts, ``~/…``, or a path relative to the home directory. ``..`` components
    and absolute paths elsewhere are refused with one sentence.
    """
    raw = text.strip()
    if "\x00" in raw:
        raise InvalidInput("A dataset path cannot contain NUL characters.")
    home = storage_roots(identity, layout)[0]
    if raw == "~" or raw.startswith("~/"):
        raw = home.mount + raw[1:]
    path = PurePosixPath(raw)
    if ".." in path.parts:
        raise InvalidInput(
            f"The dataset path {shown(text.strip())!r} may not contain '..'; "
            "give a path inside your storage."
        )
    if not path.is_absolute():
        return home, path
    for root in storage_roots(identity, layout):
        mount = PurePosixPath(root.mount)
        if path == mount or mount in path.parents:
            return root, path.relative_to(mount)
    project = _project_named(path, layout)
    if project is not None:
        own_projects = ", ".join(identity.groups) or "none"
        raise InvalidInput(
            f"The dataset path {shown(text.strip())!r} is outside your storage: "
            f"{project[:80]!r} is not one of your project directories (yours: {own_projects})."
        )
    raise InvalidInput(
        f"The dataset path {shown(text.strip())!r} is outside your storage; "
        f"give a path under {home.mount}"
        + (" or one of your project directories." if identity.groups else ".")
    )


def _project_named(path: PurePosixPath, layout: StorageLayout) -> str | None:
    """Name the project a session path points into, whoever's it is.

    The path looks like ``/arc/projects/<project>/…``. Anything else gives None.
    """
    prefix, has_group, _ = layout.project_mount.partition("{group}")
    if not has_group or not prefix.endswith("/") or not str(path).startswith(prefix):
        return None
    return str(path)[len(prefix) :].split("/", 1)[0] or None


class _LinkDirectories:
    """Directories only the hub writes, one per dataset read, in one made per process.

    A temporary directory of its own for each read cost the hub's event loop about a
    millisecond a spawn (its random name, then a tree removal); these are a ``mkdir`` and a
    ``rmdir``. The process's directory goes when the process ends. It is in ``memory`` where
    the hub may write there: on a journalled disk the four calls of a read cost about 120 µs
    of CPU, on tmpfs about 20.
    """

    # mkdtemp makes a private directory with a random name there, as it does in /tmp.
    def __init__(self, memory: str = "/dev/shm") -> None:  # noqa: S108
        self.memory = memory
        self._root: str | None = None
        # The process and user that made it: a child forked since, or a process whose user
        # changed, makes its own.
        self._owner = (0, 0)
        self._names = itertools.count()

    def make(self) -> str:
        """A new empty directory, mode 0700, whose name is never used again."""
        try:
            return self._make()
        except FileNotFoundError:
            # Whatever cleans the temporary directory removed ours: make another.
            self._root = None
            return self._make()

    def _make(self) -> str:
        owner = (os.getpid(), os.geteuid())
        if self._root is None or self._owner != owner:
            where = self.memory if os.access(self.memory, os.W_OK | os.X_OK) else None
            self._root = tempfile.mkdtemp(prefix="casaspawner-datasets-", dir=where)
            self._owner = owner
            atexit.register(_remove_tree, self._root, owner[0])
        path = os.path.join(self._root, str(next(self._names)))
        os.mkdir(path, 0o700)
        return path

    @staticmethod
    def remove(path: str) -> None:
        """Remove a directory :meth:`make` gave, and what was put in it."""
        try:
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            # More than the link is there.
            shutil.rmtree(path, ignore_errors=True)


def _remove_tree(path: str, owner: int) -> None:
    # Only in the process that made it, not in a child that forked and exits.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


_LINKS = _LinkDirectories()


@functools.cache
def _proc_links() -> bool:
    """Whether this process sees its descriptors as links in ``/proc/self/fd``."""
    return os.path.isdir("/proc/self/fd")


class StorageMountReader:
    """Reads datasets through a read-only mount of the whole storage on the hub.

    The storage is Cavern, for example. ``root`` is the hub-side directory holding
    ``home/<user>`` and ``projects/<group>``. Symbolic links are followed as the session would
    follow them, as long as every step stays inside the user's own storage areas, home and
    projects. A link from the home into one of the user's projects is fine. One into another
    user's home is refused. Absolute link targets may name session paths, such as
    ``/arc/projects/<group>/…`` as links made inside a session do, or hub paths under ``root``.

    The walk opens one directory at a time, relative to the last one and never through a link
    (``O_NOFOLLOW``). Links are read and their targets walked the same way. :meth:`open` gives
    the resolver the very directory the walk ended on, through ``/proc/self/fd``. So a link
    swapped in after a step was checked cannot redirect it. Below that directory the resolver
    opens everything the same way (``datasets.tree``).

    The hub walks from its storage threads, never its event loop; a walk may take ``deadline``
    seconds (:mod:`casaspawner.datasets.storage`).
    """

    #: Like the kernel's limit on links followed while resolving one path.
    MAX_LINKS = 40

    def __init__(self, root: str | Path, layout: StorageLayout, deadline: float = 60.0) -> None:
        self.root = Path(root)
        self.layout = layout
        self.deadline = deadline

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        walk = functools.partial(self._walk, text, identity)
        fd, located = await self._in_storage_thread(
            walk, text, late=lambda walked: os.close(walked[0])
        )
        try:
            private = _LINKS.make()
            try:
                # The resolver reads the directory the walk opened, under the dataset's own name,
                # which matters to it. It reads it through a link in a directory only the hub can
                # write.
                pinned = Path(private) / (located.name or "dataset")
                pinned.symlink_to(f"/proc/self/fd/{fd}")
                # Without /proc the resolver reads the directory by name, as checked.
                yield pinned if _proc_links() else located
            finally:
                _LINKS.remove(private)
        finally:
            os.close(fd)

    async def look(self, text: str, identity: Identity, inspect: Callable[[int, str], T]) -> T:
        """Walk to the dataset directory as :meth:`open` does, then ``inspect`` it.

        ``inspect`` gets the open directory and the name :meth:`open` gives it. The walk and
        ``inspect`` share one of the hub's storage threads: each hop to a thread costs the hub
        CPU, the more so the busier its event loop.
        """

        def walk_and_inspect() -> T:
            fd, located = self._walk(text, identity)
            try:
                return inspect(fd, located.name or "dataset")
            finally:
                os.close(fd)

        return await self._in_storage_thread(walk_and_inspect, text)

    async def _in_storage_thread(
        self, call: Callable[[], R], text: str, late: Callable[[R], object] | None = None
    ) -> R:
        """``call()`` in the hub's storage threads, within the reader's deadline.

        ``late`` gets what comes back past the deadline.
        """
        what = repr(shown(text.strip()))
        return await STORAGE.call(call, deadline=self.deadline, what=what, late=late)

    def _walk(self, text: str, identity: Identity) -> tuple[int, Path]:
        """Walk to the dataset directory and open it.

        Returns an open descriptor of the directory and its hub path. Every refusal is one
        sentence.
        """
        name = shown(text.strip())
        try:
            return self._walk_descriptors(text, identity, name)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NoSuchDataset(
                    f"There is no dataset directory at {name!r} in your storage."
                ) from None
            raise InvalidInput(
                f"The dataset path {name!r} cannot be opened "
                f"({exc.strerror or type(exc).__name__}); "
                "give an ALMA dataset directory or an ALMA identifier."
            ) from None

    def _walk_descriptors(self, text: str, identity: Identity, name: str) -> tuple[int, Path]:
        root, relative = locate_in_storage(text, identity, self.layout)
        roots = {
            PurePosixPath(r.mount): self.root / r.sub_path
            for r in storage_roots(identity, self.layout)
        }
        # The mounts' parents, such as /arc and /arc/home, are in every session.
        ancestors = {parent for mount in roots for parent in mount.parents}
        outside = InvalidInput(
            f"The dataset path {name!r} leads outside your storage through a link."
        )

        def in_session(target: PurePosixPath) -> PurePosixPath:
            """Turn an absolute link target into a session path.

            Hub paths under ``root`` are mapped back to the session's.
            """
            hub_root = PurePosixPath(self.root)
            if hub_root in target.parents:
                below = target.relative_to(hub_root)
                for mount, hub in roots.items():
                    sub = PurePosixPath(hub).relative_to(hub_root)
                    if below == sub or sub in below.parents:
                        return mount / below.relative_to(sub)
            return target

        def hub_path(path: PurePosixPath) -> Path:
            mount = max(
                (m for m in roots if m == path or m in path.parents), key=lambda m: len(m.parts)
            )
            return roots[mount] / path.relative_to(mount)

        # With O_PATH, a directory the hub may only search, such as one of mode 0711, can be walked
        # through, as by name.
        directory = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
        # The session path walked so far, one (path, descriptor) entry per component. The
        # descriptor is None above the mounts.
        trail: list[tuple[PurePosixPath, int | None]] = [(PurePosixPath("/"), None)]
        pending = list((PurePosixPath(root.mount) / relative).parts[1:])
        links = 0
        try:
            while pending:
                part = pending.pop(0)
                if part in ("", "."):
                    continue
                if part == "..":
                    if len(trail) > 1:
                        _close(trail.pop()[1])
                    continue
                current, fd = trail[-1]
                candidate = current / part
                # A storage root is mounted as it is, like a pod's sub-path mount.
                if candidate in roots:
                    trail.append((candidate, os.open(roots[candidate], directory)))
                    continue
                if fd is None:
                    if candidate not in ancestors:
                        raise outside
                    trail.append((candidate, None))
                    continue
                try:
                    trail.append((candidate, os.open(part, directory | os.O_NOFOLLOW, dir_fd=fd)))
                    continue
                except OSError as exc:
                    # A link, refused by O_NOFOLLOW, or not a directory at all.
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    try:
                        target = PurePosixPath(os.readlink(part, dir_fd=fd))
                    except OSError as not_link:
                        raise (exc if not_link.errno == errno.EINVAL else not_link) from None
                links += 1
                if links > self.MAX_LINKS:
                    raise InvalidInput(f"The dataset path {name!r} goes through too many links.")
                if target.is_absolute():
                    pending = list(in_session(target).parts[1:]) + pending
                    while len(trail) > 1:
                        _close(trail.pop()[1])
                else:
                    pending = list(target.parts) + pending
            current, fd = trail[-1]
            # The walk ended above the user's own directories.
            if fd is None:
                raise outside
            # The descriptor is handed to the caller, not closed below.
            trail[-1] = (current, None)
            return fd, hub_path(current)
        finally:
            for _, descriptor in trail:
                _close(descriptor)


class LocalDirectoryReader:
    """Reads any directory on this machine as given.

    For the ``casaspawner pod`` dry run and tests, never for a hub.
    """

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise NoSuchDataset(f"There is no dataset directory at {shown(text)!r}.")
        yield path
