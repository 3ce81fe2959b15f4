"""How the hub reads a dataset the user named by a path in their session's storage (pure, JupyterHub-free).

A path the user types (``/arc/home/alice/…``, ``~/…`` or relative to the home) is mapped to the storage root
with the same templates the session's mounts use (:func:`locate_in_storage`); a *dataset reader* then gives the
resolver a local directory to read:

* :class:`StorageMountReader` — a read-only mount of the whole storage on the hub (``storage_hub_path``);
* :class:`VOSpaceReader` — a VOSpace 2 service, with the user's token (``vospace_url``);
* :class:`LocalDirectoryReader` — any directory on this machine (the ``casaspawner pod`` dry run).

Anything with the same ``open`` (:class:`DatasetReader`) plugs in as ``dataset_reader``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fnmatch
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from defusedxml.ElementTree import fromstring as defused_fromstring

from casaspawner.errors import InvalidInput, NoSuchDataset, shown
from casaspawner.plan import Identity, StorageLayout


class DatasetReader(Protocol):
    """Gives the hub read access to a dataset the user named by a path in their session's storage.

    ``open`` is an async context manager yielding a local directory the resolver may read; it raises
    ``InvalidInput`` (one sentence) for paths outside the user's storage.
    """

    def open(self, text: str, identity: Identity) -> contextlib.AbstractAsyncContextManager[Path]: ...


@dataclasses.dataclass(frozen=True)
class StorageRoot:
    """One place a session sees storage: ``mount`` in the session is ``sub_path`` of the storage root."""

    mount: str
    sub_path: str


def storage_roots(identity: Identity, layout: StorageLayout) -> list[StorageRoot]:
    """The user's home and project directories as the session sees them, and where they live in storage."""
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
    """Map a path the user typed to (storage root, relative path); pure, never touches the file system.

    Accepted: an absolute path under the session's home or project mounts, ``~/…``, or a path relative to
    the home directory. Refused with one sentence: ``..`` components and absolute paths elsewhere.
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
            f"The dataset path {text.strip()!r} may not contain '..'; give a path inside your storage."
        )
    if not path.is_absolute():
        return home, path
    for root in storage_roots(identity, layout):
        mount = PurePosixPath(root.mount)
        if path == mount or mount in path.parents:
            return root, path.relative_to(mount)
    project = _project_named(path, layout)
    if project is not None:
        yours = ", ".join(identity.groups) or "none"
        raise InvalidInput(
            f"The dataset path {text.strip()!r} is outside your storage: {project[:80]!r} is not one of your "
            f"project directories (yours: {yours})."
        )
    raise InvalidInput(
        f"The dataset path {text.strip()!r} is outside your storage; give a path under {home.mount}"
        + (" or one of your project directories." if identity.groups else ".")
    )


def _project_named(path: PurePosixPath, layout: StorageLayout) -> str | None:
    """The project a session path points into (``/arc/projects/<project>/…``), whoever's it is; else None."""
    prefix, found, _ = layout.project_mount.partition("{group}")
    if not found or not prefix.endswith("/") or not str(path).startswith(prefix):
        return None
    return str(path)[len(prefix) :].split("/", 1)[0] or None


class StorageMountReader:
    """Reads datasets through a read-only mount of the whole storage (Cavern) on the hub.

    ``root`` is the hub-side directory holding ``home/<user>`` and ``projects/<group>``. Symbolic links are
    followed as the session would follow them, as long as every step stays inside the user's own storage
    areas (home and projects): a link from the home into one of the user's projects is fine, one into another
    user's home is refused. Absolute link targets may name session paths (``/arc/projects/<group>/…``, as links
    made inside a session do) or hub paths under ``root``.

    The walk opens one directory at a time, relative to the last one and never through a link (``O_NOFOLLOW``;
    links are read and their targets walked the same way), and :meth:`open` gives the resolver the very
    directory it ended on (through ``/proc/self/fd``), so a link swapped in after a step was checked cannot
    redirect it; below that directory the resolver opens everything the same way (``datasets.tree``).
    """

    MAX_LINKS = 40  # like the kernel's limit on links followed while resolving one path

    def __init__(self, root: str | Path, layout: StorageLayout) -> None:
        self.root = Path(root)
        self.layout = layout

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        fd, located = await asyncio.to_thread(self._walk, text, identity)
        try:
            with tempfile.TemporaryDirectory(prefix="casaspawner-dataset-") as private:
                # The resolver reads the directory the walk opened, under the dataset's own name (it matters
                # to it), through a link in a directory only the hub can write.
                pinned = Path(private) / (located.name or "dataset")
                pinned.symlink_to(f"/proc/self/fd/{fd}")
                yield pinned if pinned.is_dir() else located  # no /proc: by name, as checked
        finally:
            os.close(fd)

    def _walk(self, text: str, identity: Identity) -> tuple[int, Path]:
        """(an open descriptor of the dataset directory, its hub path); every refusal is one sentence."""
        name = shown(text.strip())
        try:
            return self._walk_descriptors(text, identity, name)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NoSuchDataset(f"There is no dataset directory at {name!r} in your storage.") from None
            raise InvalidInput(
                f"The dataset path {name!r} cannot be opened ({exc.strerror or type(exc).__name__}); give an "
                "ALMA dataset directory or an ALMA identifier."
            ) from None

    def _walk_descriptors(self, text: str, identity: Identity, name: str) -> tuple[int, Path]:
        root, relative = locate_in_storage(text, identity, self.layout)
        roots = {PurePosixPath(r.mount): self.root / r.sub_path for r in storage_roots(identity, self.layout)}
        ancestors = {
            parent for mount in roots for parent in mount.parents
        }  # /arc, /arc/home: in every session
        outside = InvalidInput(f"The dataset path {name!r} leads outside your storage through a link.")

        def in_session(target: PurePosixPath) -> PurePosixPath:
            """An absolute link target as a session path (hub paths under ``root`` are mapped back)."""
            hub_root = PurePosixPath(self.root)
            if hub_root in target.parents:
                below = target.relative_to(hub_root)
                for mount, hub in roots.items():
                    sub = PurePosixPath(hub).relative_to(hub_root)
                    if below == sub or sub in below.parents:
                        return mount / below.relative_to(sub)
            return target

        def hub_path(path: PurePosixPath) -> Path:
            mount = max((m for m in roots if m == path or m in path.parents), key=lambda m: len(m.parts))
            return roots[mount] / path.relative_to(mount)

        # O_PATH: a directory the hub may only search (mode 0711, say) can be walked through, as by name.
        directory = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
        # The session path walked so far, one entry per component: (path, descriptor; None above the mounts).
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
                if candidate in roots:  # mounted as it is, like a pod's sub-path mount
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
                except OSError as exc:  # a link (refused by O_NOFOLLOW), or not a directory at all
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
            if fd is None:  # the walk ended above the user's own directories
                raise outside
            trail[-1] = (current, None)  # handed to the caller, not closed below
            return fd, hub_path(current)
        finally:
            for _, descriptor in trail:
                _close(descriptor)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class LocalDirectoryReader:
    """Reads any directory on this machine as given (the ``casaspawner pod`` dry run and tests; not a hub)."""

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise NoSuchDataset(f"There is no dataset directory at {text!r}.")
        yield path


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but sends the user's token (``Authorization``) only to the origin it was meant for:
    a redirect to another scheme, host or port gets the request without it."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        token = req.unredirected_hdrs.get("Authorization")
        if new is not None and token and _origin(new.full_url) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", token)
        return new


_OPENER = urllib.request.build_opener(_SameOriginRedirects())

_VOS = "{http://www.ivoa.net/xml/VOSpace/v2.0}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_VOS_LENGTH = "ivo://ivoa.net/vospace/core#length"


class VOSpaceReader:
    """Reads datasets through a VOSpace 2 service (e.g. CANFAR's Cavern ``…/arc``) with the user's token.

    The dataset's directory tree is walked with ``GET {url}/nodes/{path}``; only the small files the resolver
    reads (pipeline manifests, AQUA reports, weblog ``t1-1.html`` pages or packed weblogs, calibration scripts,
    CASA logs) are fetched from ``GET {url}/files/{path}`` into a private temporary directory. Link nodes are
    never followed, so a dataset cannot lead out of the user's own directories. HTTP redirects are followed,
    but the token is only sent again to the same origin (scheme, host and port).
    """

    #: file names worth fetching → the largest size fetched
    WANTED: tuple[tuple[str, int], ...] = (
        ("*.xml", 32 << 20),
        ("t1-1.html", 4 << 20),
        ("*.weblog.tgz", 64 << 20),
        ("*.py", 1 << 20),
        ("*.log", 16 << 20),
    )
    MAX_DEPTH = 8
    MAX_NODES = 5000

    def __init__(
        self, url: str, layout: StorageLayout, token: str | None = None, *, timeout: float = 10
    ) -> None:
        self.url = url.rstrip("/")
        self.layout = layout
        self.token = token
        self.timeout = timeout

    def _get(self, kind: str, path: str, limit: int) -> bytes | None:
        request = urllib.request.Request(f"{self.url}/{kind}/{urllib.parse.quote(path)}")  # noqa: S310
        if self.token:  # "unredirected": urllib never copies it into a redirect; _SameOriginRedirects may
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                data: bytes = response.read(limit + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise InvalidInput(
                f"Your storage service refused to list or read {path!r} (HTTP {exc.code})."
            ) from None
        except (OSError, urllib.error.URLError):
            raise InvalidInput("Your storage service could not be reached; try again in a moment.") from None
        return data if len(data) <= limit else None

    def _children(self, path: str) -> list[tuple[str, str, int | None]]:
        """(name, kind ContainerNode|DataNode|LinkNode, length) of the nodes in a container."""
        data = self._get("nodes", path, 16 << 20)
        if data is None:
            raise NoSuchDataset(f"There is no dataset directory at {path!r} in your storage.")
        try:
            root = defused_fromstring(data)
        except Exception:  # defusedxml raises several unrelated types for hostile or broken XML
            raise InvalidInput(
                "Your storage service answered with something that is not a VOSpace node."
            ) from None
        if not (root.get(_XSI_TYPE) or "").endswith("ContainerNode"):
            raise InvalidInput(f"{path!r} in your storage is not a directory.")
        children = []
        for node in root.iter(f"{_VOS}node"):
            if node is root:
                continue
            name = (node.get("uri") or "").rstrip("/").rsplit("/", 1)[-1]
            kind = (node.get(_XSI_TYPE) or "").split(":")[-1]
            length = None
            for prop in node.iter(f"{_VOS}property"):
                if prop.get("uri") == _VOS_LENGTH and (prop.text or "").isdigit():
                    length = int(prop.text or "0")
            if name and name not in (".", "..") and "/" not in name:
                children.append((name, kind, length))
        return children

    def mirror(self, text: str, identity: Identity, into: Path) -> Path:
        """Copy the resolver's files of the dataset at ``text`` into ``into``; returns the local dataset path."""
        root, relative = locate_in_storage(text, identity, self.layout)
        top = str(PurePosixPath(root.sub_path) / relative)
        local_top = into / (PurePosixPath(top).name or "dataset")
        local_top.mkdir()
        pending = [(top, local_top, 0)]
        seen = 0
        while pending:
            path, local, depth = pending.pop()
            for name, kind, length in self._children(path):
                seen += 1
                if seen > self.MAX_NODES:
                    raise InvalidInput(
                        f"{text!r} holds too many files to be one ALMA dataset; give its member directory."
                    )
                child = f"{path}/{name}"
                if kind == "ContainerNode" and depth < self.MAX_DEPTH and local.name != "html":
                    (local / name).mkdir()
                    pending.append((child, local / name, depth + 1))
                elif kind == "DataNode":
                    limit = next((size for pattern, size in self.WANTED if fnmatch.fnmatch(name, pattern)), 0)
                    if limit and (length is None or length <= limit):
                        data = self._get("files", child, limit)
                        if data is not None:
                            (local / name).write_bytes(data)
        return local_top

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        with tempfile.TemporaryDirectory(prefix="casaspawner-vospace-") as tmp:
            yield await asyncio.to_thread(self.mirror, text, identity, Path(tmp))
