"""Reading datasets through a VOSpace 2 service, such as CANFAR's Cavern."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from defusedxml.ElementTree import fromstring as defused_fromstring

from casaspawner.errors import InvalidInput, NoSuchDataset, shown
from casaspawner.net import origin
from casaspawner.plan import Identity, StorageLayout
from casaspawner.session.readers import locate_in_storage


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, sending the user's token only to its own origin.

    The token is the ``Authorization`` header. A redirect to another scheme, host or port gets the
    request without it.
    """

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
        if new is not None and token and origin(new.full_url) == origin(req.full_url):
            new.add_unredirected_header("Authorization", token)
        return new


_OPENER = urllib.request.build_opener(_SameOriginRedirects())

_VOS = "{http://www.ivoa.net/xml/VOSpace/v2.0}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_VOS_LENGTH = "ivo://ivoa.net/vospace/core#length"


class VOSpaceReader:
    """Reads datasets through a VOSpace 2 service with the user's token.

    The service is CANFAR's Cavern ``…/arc``, for example. The dataset's directory tree is walked
    with ``GET {url}/nodes/{path}``. Only the small files the resolver reads are fetched, from
    ``GET {url}/files/{path}`` into a private temporary directory. These are pipeline manifests,
    AQUA reports, weblog ``t1-1.html`` pages or packed weblogs, calibration scripts and CASA logs.
    Link nodes are never followed, so a dataset cannot lead out of the user's own directories.
    HTTP redirects are followed, but the token is only sent again to the same origin: the same
    scheme, host and port.
    """

    #: File names worth fetching, each with the largest size fetched.
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
        request = urllib.request.Request(  # noqa: S310
            f"{self.url}/{kind}/{urllib.parse.quote(path)}"
        )
        # "Unredirected": urllib never copies the header into a redirect. _SameOriginRedirects may.
        if self.token:
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
            raise InvalidInput(
                "Your storage service could not be reached; try again in a moment."
            ) from None
        return data if len(data) <= limit else None

    def _children(self, path: str) -> list[tuple[str, str, int | None]]:
        """List the nodes in a container with their kinds and lengths.

        Each node is ``(name, kind, length)``. The kind is ContainerNode, DataNode or LinkNode.
        """
        data = self._get("nodes", path, 16 << 20)
        if data is None:
            raise NoSuchDataset(f"There is no dataset directory at {path!r} in your storage.")
        try:
            root = defused_fromstring(data)
        except Exception:
            # defusedxml raises several unrelated types for hostile or broken XML.
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
        """Copy the resolver's files of the dataset at ``text`` into ``into``.

        Returns the local dataset path.
        """
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
                        f"{shown(text)!r} holds too many files to be one ALMA dataset; "
                        "give its member directory."
                    )
                child = f"{path}/{name}"
                if kind == "ContainerNode" and depth < self.MAX_DEPTH and local.name != "html":
                    (local / name).mkdir()
                    pending.append((child, local / name, depth + 1))
                elif kind == "DataNode":
                    limit = next(
                        (size for pattern, size in self.WANTED if fnmatch.fnmatch(name, pattern)),
                        0,
                    )
                    if limit and (length is None or length <= limit):
                        data = self._get("files", child, limit)
                        if data is not None:
                            (local / name).write_bytes(data)
        return local_top

    @contextlib.asynccontextmanager
    async def open(self, text: str, identity: Identity) -> AsyncIterator[Path]:
        with tempfile.TemporaryDirectory(prefix="casaspawner-vospace-") as tmp:
            yield await asyncio.to_thread(self.mirror, text, identity, Path(tmp))
