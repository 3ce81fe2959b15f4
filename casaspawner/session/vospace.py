"""Reading datasets through a VOSpace 2.1 service, such as CANFAR's Cavern.

The reader lists only the directories the resolver looks in and fetches only the files it opens,
kind by kind in ALMA's order of evidence, within a budget per dataset. See
``docs/architecture.md`` (*Archive and VOSpace clients*) for why it speaks VOSpace itself rather
than through CADC's ``vos`` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Literal

from defusedxml.ElementTree import fromstring as defused_fromstring

from casaspawner.catalog.model import Catalog
from casaspawner.datasets.evidence import LIMITS
from casaspawner.datasets.layout import MEMBER_DIR, MOUS_SUBDIRS
from casaspawner.datasets.worker import WorkerLimits
from casaspawner.errors import (
    CasaspawnerError,
    InvalidInput,
    NoSuchDataset,
    VersionUnknown,
    shown,
)
from casaspawner.plan import Identity, StorageLayout
from casaspawner.session.readers import locate_in_storage

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

    from casaspawner.datasets.transfer import BoundedSession, TransferError

_VOS = "{http://www.ivoa.net/xml/VOSpace/v2.0}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_VOS_LENGTH = "ivo://ivoa.net/vospace/core#length"
MiB = 1 << 20
#: A listing page: at most ``PAGE`` children (VOSpace's ``limit``), read within this many bytes.
PAGE = 1000
_PAGE_BYTES = 16 * MiB
#: What the resolver reads of packed archives at most (``evidence._TAR_COMPRESSED``).
_PACKED = 4 << 30
#: The most files of one kind the resolver reads (``evidence._MAX_FILES``).
_PER_KIND = 16
#: Where the resolver looks for evidence below the MOUS (``evidence._SEARCH_DIRS``).
_SEARCH_DIRS = (".", "script", "qa", "log", "calibration", "product")
#: How far below a dataset directory the resolver looks for its MOUS (``layout._MAX_DEPTH``).
_MOUS_DEPTH = 4
#: The end of every budget sentence.
_PER_DATASET = "this hub reads from storage for one dataset"

Kind = Literal["dir", "file", "link", "other"]
#: Whether the resolver, run on a directory, finds a CASA version there now.
Probe = Callable[[Path], Awaitable[bool]]


@dataclass(frozen=True)
class VOSpaceBudget:
    """What reading one dataset through VOSpace may cost the hub.

    ``bytes`` and ``files`` bound what is fetched, ``listings`` the listing requests and
    ``nodes`` the directory entries they return. A dataset that would need more is refused
    with one sentence.
    """

    bytes: int = 256 * MiB
    files: int = 64
    listings: int = 500
    nodes: int = 50_000


@dataclass(frozen=True)
class _Step:
    """Files the resolver opens for one kind of evidence, as ``datasets.evidence`` finds them.

    ``names`` are case-sensitive patterns looked for in ``dirs`` below the MOUS; with ``pages``,
    in directories named ``html`` down to that many levels below each of ``dirs``. The
    resolver reads ``limit`` bytes of a file: a longer one is too large, or, with ``truncate``,
    read up to there. It opens the first ``_PER_KIND`` files, or with ``every`` all of them;
    the first that tells a version decides, unless ``majority``: then all of them vote.
    """

    kind: str
    names: tuple[str, ...]
    dirs: tuple[str, ...]
    limit: int
    truncate: bool = False
    pages: int = 0
    every: bool = False
    calibration_first: bool = False
    majority: bool = False


#: ALMA's order of evidence, as the resolver reads it (``evidence.READERS``). The VOSpace test
#: compares a read through this reader with a local read for every era of synthetic dataset.
STEPS = (
    _Step(
        "pipeline manifest",
        ("*pipeline_manifest.xml",),
        _SEARCH_DIRS,
        LIMITS["manifest"],
        calibration_first=True,
    ),
    _Step("AQUA report", ("*pipeline_aquareport.xml",), _SEARCH_DIRS, LIMITS["aquareport"]),
    _Step("weblog page", ("t1-1.html",), ("qa", "."), LIMITS["weblog"], pages=5),
    _Step("packed weblog", ("*weblog.tgz", "*weblog.tar.gz"), ("qa", "."), _PACKED, every=True),
    _Step(
        "calibration script",
        ("*scriptForCalibration.py",),
        ("script", "."),
        LIMITS["script"],
        truncate=True,
        majority=True,
    ),
    _Step("CASA log", ("casa*.log",), ("log",), LIMITS["casalog"], truncate=True),
    _Step("packed CASA log", ("*.tgz", "*.tar.gz"), ("log",), _PACKED, every=True),
)


@dataclass(frozen=True)
class _Node:
    name: str
    kind: Kind
    length: int | None


class _OverBudget(Exception):
    """Reading on would exceed the budget; ``str()`` says what, to end a sentence."""


@dataclass
class _Spent:
    bytes: int = 0
    files: int = 0
    listings: int = 0
    nodes: int = 0
    listed: dict[str, list[_Node] | None] = field(default_factory=dict)


async def tells_version(
    path: Path,
    *,
    catalog: Catalog | None = None,
    catalog_path: str | None = None,
    limits: WorkerLimits | None = None,
) -> bool:
    """Whether the resolver, in a worker process, finds evidence in ``path``.

    A ``VersionUnknown`` saying that nothing tells the version (the wording of
    ``resolve.read_evidence``) is no; any other answer, a release or an error, cannot change
    with more evidence of a later kind, so it is yes. The spawners pass their own catalog and
    worker limits.
    """
    from casaspawner.catalog.model import load_catalog
    from casaspawner.datasets.worker import WorkerFailed, resolve_in_worker

    try:
        await resolve_in_worker(
            path,
            path.name,
            catalog or load_catalog(catalog_path),
            catalog_path=catalog_path,
            limits=limits or WorkerLimits(),
        )
    except VersionUnknown as exc:
        return not exc.finding.startswith("Nothing")
    except (CasaspawnerError, WorkerFailed):
        return True
    return True


class VOSpaceReader:
    """Reads datasets through a VOSpace 2.1 service with the user's token.

    The service is CANFAR's Cavern ``…/arc``, for example: directories are listed with
    ``GET {url}/nodes/{path}`` (``limit``/``uri`` paging), files fetched from
    ``GET {url}/files/{path}`` into a private temporary directory.

    Only the directories the resolver looks in are listed: the way down to the dataset's MOUS,
    then the MOUS's evidence directories. Only the files it opens are fetched, one kind at a
    time in ALMA's order; after each kind, ``probe`` (by default the resolver in a worker
    process) tells whether the version is known, and if so nothing more is fetched. A file
    the resolver would only find too large is not fetched at all: an empty file of its size
    stands in for it. ``budget`` bounds what one dataset costs; ``timeout`` bounds all its
    requests together; ``page`` is how many entries one listing request asks for. Link nodes
    are never followed, and the token is sent only to the service's own origin, never after a
    redirect elsewhere.
    """

    def __init__(
        self,
        url: str,
        layout: StorageLayout,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        budget: VOSpaceBudget = VOSpaceBudget(),
        probe: Probe | None = None,
        page: int = PAGE,
    ) -> None:
        self.url = url.rstrip("/")
        self.page = page
        self.layout = layout
        self.token = token
        self.timeout = timeout
        self.budget = budget
        self.probe = probe or tells_version

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        root, relative = locate_in_storage(text, identity, self.layout)
        top = str(PurePosixPath(root.sub_path) / relative)
        with tempfile.TemporaryDirectory(prefix="casaspawner-vospace-") as tmp:
            local = Path(tmp) / (PurePosixPath(top).name or "dataset")
            read = _Read(self, top, local, shown(text.strip()))
            try:
                mous = await asyncio.to_thread(read.locate)
                if mous is not None:
                    await self._evidence(read, mous)
            finally:
                read.session.close()
            yield local

    async def _evidence(self, read: _Read, mous: str) -> None:
        """Fetch the MOUS's evidence, kind by kind, until the probe finds a version."""
        unprobed = False
        for step in STEPS:
            fetched, blocked = await asyncio.to_thread(read.fetch, mous, step)
            unprobed = unprobed or fetched > 0
            if blocked is not None:
                # What was fetched before the budget ran out may decide, unless all must vote.
                if unprobed and not step.majority and await self.probe(read.local):
                    return
                raise VersionUnknown(
                    f"Nothing this hub read of {read.name} tells its CASA version, and reading "
                    f"on would mean {blocked}"
                )
            if unprobed and step is not STEPS[-1]:
                if await self.probe(read.local):
                    return
                unprobed = False


class _Read:
    """One dataset's reading: its requests, its budget and its local copy."""

    def __init__(self, reader: VOSpaceReader, top: str, local: Path, name: str) -> None:
        self.reader = reader
        self.top = top
        self.local = local
        self.name = name
        self.spent = _Spent()
        self.session = _session(reader)

    # Finding the MOUS, as layout.open_mous does

    def locate(self) -> str | None:
        """List the way down to the dataset's MOUS, and return its path.

        None means no single MOUS. The local copy gets every directory listed, so the resolver
        finds the same MOUS, or the same lack of one, and says the same.
        """
        self.local.mkdir()
        try:
            children = self.listing(self.top, top=True)
        except _OverBudget:
            raise self._too_many() from None
        dirs = {node.name for node in children if node.kind == "dir"}
        if (
            MEMBER_DIR.fullmatch(PurePosixPath(self.top).name)
            or len(dirs & set(MOUS_SUBDIRS)) >= 2
        ):
            return self.top
        members: list[str] = []
        pending = [(self.top, 0)]
        try:
            while pending:
                path, depth = pending.pop(0)
                for node in self.listing(path):
                    if node.kind != "dir":
                        continue
                    child = f"{path}/{node.name}"
                    if MEMBER_DIR.fullmatch(node.name):
                        members.append(child)
                    elif depth < _MOUS_DEPTH and not node.name.startswith("."):
                        pending.append((child, depth + 1))
        except _OverBudget:
            raise self._too_many() from None
        return members[0] if len(members) == 1 else None

    def _too_many(self) -> InvalidInput:
        return InvalidInput(
            f"{self.name!r} holds too many files to be one ALMA dataset; "
            "give its member directory."
        )

    # One kind of evidence

    def fetch(self, mous: str, step: _Step) -> tuple[int, str | None]:
        """Fetch the files the resolver opens for ``step``, in its order.

        Returns how many were fetched, and, if the budget stopped it, what reading on would take
        (to end a sentence).
        """
        try:
            paths = self._candidates(mous, step)
        except _OverBudget as exc:
            return 0, str(exc)
        fetched = 0
        for path, length in paths if step.every else paths[:_PER_KIND]:
            try:
                fetched += self._file(mous, path, length, step)
            except _OverBudget as exc:
                return fetched, str(exc)
        return fetched, None

    def _candidates(self, mous: str, step: _Step) -> list[tuple[PurePosixPath, int | None]]:
        """The step's files below the MOUS, as the resolver orders them, with their lengths."""
        found: dict[PurePosixPath, int | None] = {}
        if step.pages:
            for top in step.dirs:
                for path, nodes in self._walk(mous, PurePosixPath(top), step.pages):
                    if path.name != "html":
                        continue
                    for node in nodes:
                        if node.kind == "file" and node.name in step.names:
                            found[path / node.name] = node.length
        else:
            for sub in step.dirs:
                for node in self._below(mous, PurePosixPath(sub)) or []:
                    if node.kind == "file" and any(
                        fnmatch.fnmatchcase(node.name, p) for p in step.names
                    ):
                        found[PurePosixPath(sub, node.name)] = node.length
        paths = sorted(found)
        if step.calibration_first:
            paths.sort(key=lambda p: (0 if "cal" in p.name else 1, p.name))
        return [(path, found[path]) for path in paths]

    def _walk(
        self, mous: str, top: PurePosixPath, depth: int
    ) -> list[tuple[PurePosixPath, list[_Node]]]:
        """``top`` and the directories below it to ``depth`` levels, as ``tree.walk``."""
        nodes = self._below(mous, top)
        if nodes is None:
            return []
        walked = [(top, nodes)]
        if depth > 0:
            for node in nodes:
                if node.kind == "dir":
                    walked += self._walk(mous, top / node.name, depth - 1)
        return walked

    def _below(self, mous: str, sub: PurePosixPath) -> list[_Node] | None:
        """The listing of ``sub`` below the MOUS; None if it is no directory there."""
        if sub.parts:
            parent = self._below(mous, sub.parent)
            if parent is None or not any(n.name == sub.name and n.kind == "dir" for n in parent):
                return None
        return self.listing(f"{mous}/{sub}" if sub.parts else mous)

    def _file(self, mous: str, path: PurePosixPath, length: int | None, step: _Step) -> int:
        """Fetch one file the resolver opens; 1 if fetched, else 0."""
        local = self._local(f"{mous}/{path}")
        if length is not None and length > step.limit and not step.truncate:
            # The resolver refuses it by its size alone: an empty file of that size says so.
            with local.open("xb") as handle:
                handle.truncate(length)
            return 0
        budget = self.reader.budget
        if self.spent.files + 1 > budget.files:
            raise _OverBudget(f"fetching more than the {budget.files} files {_PER_DATASET}")
        left = budget.bytes - self.spent.bytes
        need = step.limit if length is None else min(length, step.limit)
        if length is not None and need > left:
            raise self._over_bytes(path, step, need)
        self.spent.files += 1
        with local.open("xb") as handle:
            status = self._download(f"{mous}/{path}", handle, step, min(step.limit, left))
            self.spent.bytes += handle.tell()
            if status == 413 and left < step.limit:
                # An unsized file that outgrew what is left of the budget.
                raise self._over_bytes(path, step, handle.tell())
            if status == 413:
                # Larger than the resolver reads: it stands in as such.
                handle.truncate(step.limit + 1)
        if status == 404:
            local.unlink()
            return 0
        return 1

    def _over_bytes(self, path: PurePosixPath, step: _Step, size: int) -> _OverBudget:
        shown_size = f"{-(-size // MiB)} MiB" if size >= MiB else f"{size} bytes"
        return _OverBudget(
            f"fetching its {step.kind} {shown(str(path))} ({shown_size}), past the "
            f"{self.reader.budget.bytes // MiB} MiB {_PER_DATASET}"
        )

    # Requests

    def listing(self, path: str, *, top: bool = False) -> list[_Node]:
        """The children of the container ``path``, all pages; also made local directories.

        The top dataset directory must be a container; below it, anything else lists as empty.
        """
        if path in self.spent.listed:
            return self.spent.listed[path] or []
        nodes: dict[str, _Node] = {}
        start: str | None = None
        while True:
            self._charge_listing()
            query = {"limit": str(self.reader.page), **({"uri": start} if start else {})}
            root = self._node(path, query, top=top)
            if root is None:
                self.spent.listed[path] = None
                return []
            page = _children(root)
            new = [node for _, node in page if node.name not in nodes]
            self._charge_nodes(len(new))
            nodes.update((node.name, node) for node in new)
            if len(page) < self.reader.page or not new:
                break
            start = page[-1][0]
        listed = sorted(nodes.values(), key=lambda node: node.name)
        self.spent.listed[path] = listed
        base = self._local(path) if path != self.top else self.local
        for node in listed:
            if node.kind == "dir":
                (base / node.name).mkdir(exist_ok=True)
        return listed

    def _node(self, path: str, query: dict[str, str], *, top: bool) -> Element | None:
        """One page of the node ``path``: its XML root, or None."""
        from casaspawner.datasets.transfer import TransferError

        session = self.session
        session.limit = _PAGE_BYTES
        url = f"{self.reader.url}/nodes/{_quote(path)}?{urllib.parse.urlencode(query)}"
        try:
            response = session.get(url)
        except TransferError as exc:
            raise self._failed(exc) from None
        if response.status_code == 404:
            if top:
                raise NoSuchDataset(
                    f"There is no dataset directory at {shown(path)!r} in your storage."
                )
            return None
        self._check(response.status_code, path)
        try:
            root: Element = defused_fromstring(response.content)
        except Exception:
            # defusedxml raises several unrelated types for hostile or broken XML.
            raise InvalidInput(
                "Your storage service answered with something that is not a VOSpace node."
            ) from None
        if root.tag != f"{_VOS}node":
            raise InvalidInput(
                "Your storage service answered with something that is not a VOSpace node."
            )
        if _kind(root) != "dir":
            if top:
                raise InvalidInput(f"{shown(path)!r} in your storage is not a directory.")
            return None
        return root

    def _download(self, path: str, into: BinaryIO, step: _Step, limit: int) -> int:
        """Fetch at most ``limit`` bytes of ``path``; return the HTTP status.

        413 means the file had more. A file the resolver reads only the start of is cut at the
        step's limit instead.
        """
        from casaspawner.datasets.transfer import TooLarge, TransferError

        url = f"{self.reader.url}/files/{_quote(path)}"
        try:
            response = self.session.download(url, into, limit, truncate=step.truncate)
        except TooLarge:
            return 413
        except TransferError as exc:
            raise self._failed(exc) from None
        if response.status_code != 404:
            self._check(response.status_code, path)
        return response.status_code

    def _check(self, status: int, path: str) -> None:
        if status in (200, 206):
            return
        if status in (401, 403):
            raise InvalidInput(
                f"Your storage service refused to list or read {shown(path)!r} (HTTP {status})."
            )
        raise InvalidInput(
            f"Your storage service answered HTTP {status} for {shown(path)!r}; "
            "try again in a moment."
        )

    def _failed(self, failure: TransferError) -> InvalidInput:
        from casaspawner.datasets.transfer import Late

        if isinstance(failure, Late):
            seconds = self.reader.timeout
            return InvalidInput(
                f"Your storage service did not answer within {seconds:g} "
                f"second{'' if seconds == 1 else 's'}; try again in a moment."
            )
        return InvalidInput("Your storage service could not be reached; try again in a moment.")

    def _charge_listing(self) -> None:
        self.spent.listings += 1
        if self.spent.listings > self.reader.budget.listings:
            raise _OverBudget(
                f"more than the {self.reader.budget.listings} directory listings {_PER_DATASET}"
            )

    def _charge_nodes(self, count: int) -> None:
        self.spent.nodes += count
        if self.spent.nodes > self.reader.budget.nodes:
            raise _OverBudget(
                f"listing more than the {self.reader.budget.nodes} entries {_PER_DATASET}"
            )

    def _local(self, path: str) -> Path:
        """Where the remote ``path`` below the dataset directory is copied."""
        return self.local.joinpath(*PurePosixPath(path).relative_to(self.top).parts)


def _session(reader: VOSpaceReader) -> BoundedSession:
    try:
        from casaspawner.datasets.transfer import BoundedSession
    except ImportError:
        raise InvalidInput(
            "This hub cannot read your storage: the requests package is missing."
        ) from None
    deadline = time.monotonic() + reader.timeout
    return BoundedSession(deadline, _PAGE_BYTES, token=reader.token, token_origin=reader.url)


def _quote(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def _kind(node: Element) -> Kind:
    """What a node is, by its ``xsi:type``; any DataNode is a file."""
    local = (node.get(_XSI_TYPE) or "").rsplit(":", 1)[-1]
    if local == "ContainerNode":
        return "dir"
    if local.endswith("DataNode"):
        return "file"
    if local == "LinkNode":
        return "link"
    return "other"


def _children(root: Element) -> list[tuple[str, _Node]]:
    """The children of a container node, in document order, with their URIs.

    A name that could not be a file name here (empty, ``.``, ``..``, with ``/`` or NUL, or
    longer than 255 bytes) is left out.
    """
    children = []
    for nodes in root.findall(f"{_VOS}nodes"):
        for node in nodes.findall(f"{_VOS}node"):
            uri = node.get("uri") or ""
            name = urllib.parse.unquote(uri.rstrip("/").rsplit("/", 1)[-1])
            if (
                name in ("", ".", "..")
                or "/" in name
                or "\0" in name
                or len(os.fsencode(name)) > 255
            ):
                continue
            length = None
            for prop in node.iter(f"{_VOS}property"):
                text = (prop.text or "").strip()
                if prop.get("uri") == _VOS_LENGTH and text.isdigit():
                    length = int(text)
            children.append((uri, _Node(name, _kind(node), length)))
    return children
