"""A VOSpace 2.1 service over a storage tree, on 127.0.0.1, that wants alice's token.

It answers as CANFAR's Cavern does, with the documents the standard defines. Where the shapes
come from (read, not copied):

- IVOA VOSpace 2.1 (REC-VOSpace-2.1, 2018): ``GET /nodes/{path}`` returns the node document;
  a container's children are ``vos:node`` elements inside ``vos:nodes``, each typed by
  ``xsi:type`` (``vos:ContainerNode``, ``vos:DataNode`` and its ``vos:UnstructuredDataNode``
  kind, ``vos:LinkNode`` with a ``vos:target``); properties are ``vos:property`` elements
  keyed by URI (``ivo://ivoa.net/vospace/core#length``, ``#date``, ``#creator``); the
  namespace stays ``http://www.ivoa.net/xml/VOSpace/v2.0``; a listing is paged with ``limit``
  and ``uri`` (the child to start from, itself included); faults are an HTTP status with the
  fault's name in a ``text/plain`` body (``NodeNotFound``, ``PermissionDenied``,
  ``InvalidURI``).
- OpenCADC's server, which Cavern is: ``cadc-vos/.../io/NodeWriter.java`` (element order:
  properties, then ``nodes`` for a container, ``accepts``/``provides`` and ``busy`` for a data
  node, ``target`` for a link), ``cadc-vos-server/.../actions/GetNodeAction.java`` (``limit``,
  ``uri`` must name a child of the target, a link is returned as itself) and
  ``cavern/.../files/FilesGetAction.java`` (``GET /files/{path}`` returns the bytes).
- CADC's Python client, ``vos`` 3.7 (``vos/vos.py``: ``Node``, ``Node.get_children``), for
  how clients page: ask for ``limit`` children, and again from the last one while a page is
  full.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from casaspawner.net import free_port

VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
CORE = "ivo://ivoa.net/vospace/core"
AUTHORITY = "vos://example.org~arc"
#: The token the service wants: alice's in :func:`support.users.auth_state`.
TOKEN = "tok-SECRET-42"


@contextlib.asynccontextmanager
async def served(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``app`` on a free port of ``host``; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port(host=host)
    await web.TCPSite(runner, host, port).start()
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _uri(path: str) -> str:
    return f"{AUTHORITY}/{urllib.parse.quote(path)}"


def _properties(local: Path, *, length: bool = True) -> str:
    info = local.lstat()
    date = dt.datetime.fromtimestamp(info.st_mtime, dt.timezone.utc)
    props = [
        (f"{CORE}#creator", "CN=alice,OU=cadc,O=hia,C=ca"),
        (f"{CORE}#date", date.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]),
        (f"{CORE}#ispublic", "false"),
    ]
    if length:
        props.insert(1, (f"{CORE}#length", str(info.st_size)))
    body = "".join(
        f'<vos:property uri={quoteattr(uri)} readOnly="true">{escape(value)}</vos:property>'
        for uri, value in props
    )
    return f"<vos:properties>{body}</vos:properties>"


def node_element(storage: Path, path: str, *, children: list[Path] | None = None) -> str:
    """The ``vos:node`` element of ``storage/path``, as NodeWriter writes it.

    A container lists ``children`` (none when listed as someone's child). A link's target names
    the node it points to inside the storage, or an external URL.
    """
    local = storage / path
    uri = quoteattr(_uri(path))
    if local.is_symlink():
        target = Path(local.readlink())
        target = target if target.is_absolute() else local.parent / target
        try:
            pointed = _uri(str(target.relative_to(storage)))
        except ValueError:
            pointed = "https://elsewhere.example.org/data"
        return (
            f'<vos:node uri={uri} xsi:type="vos:LinkNode">{_properties(local, length=False)}'
            f"<vos:target>{escape(pointed)}</vos:target></vos:node>"
        )
    if local.is_dir():
        nodes = "".join(
            node_element(storage, str(child.relative_to(storage))) for child in children or []
        )
        return (
            f'<vos:node uri={uri} xsi:type="vos:ContainerNode">{_properties(local)}'
            f"<vos:nodes>{nodes}</vos:nodes></vos:node>"
        )
    # Cavern writes DataNode; the standard's UnstructuredDataNode is a DataNode too.
    kind = "vos:UnstructuredDataNode" if local.suffix == ".log" else "vos:DataNode"
    return (
        f'<vos:node uri={uri} xsi:type="{kind}" busy="false">{_properties(local)}'
        "<vos:accepts/><vos:provides/></vos:node>"
    )


def node_document(storage: Path, path: str, children: list[Path] | None = None) -> str:
    """A whole node document: the root ``vos:node`` with both namespaces declared."""
    element = node_element(storage, path, children=children)
    declared = f'<vos:node xmlns:vos="{VOS}" xmlns:xsi="{XSI}" '
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + element.replace("<vos:node ", declared, 1)


@dataclass
class VOSpaceStandIn:
    """The service's state: what it was asked, what it sent, and how it misbehaves.

    ``page_cap`` is the most children the server returns in one page whatever the client asks;
    ``delay`` holds every reply back; ``files_sent`` counts the bytes of files served.
    """

    storage: Path
    requests: list[str] = field(default_factory=list)
    page_cap: int | None = None
    delay: float = 0.0
    files_sent: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/arc/nodes/{path:.*}", self.nodes)
        app.router.add_get("/arc/files/{path:.*}", self.files)
        return app

    async def _admit(self, request: web.Request, what: str) -> str:
        path = request.match_info["path"].strip("/")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized(text="PermissionDenied: not authenticated")
        query = f"?{request.query_string}" if request.query_string else ""
        self.requests.append(f"{what}/{path}{query}")
        if self.delay:
            await asyncio.sleep(self.delay)
        return path

    async def nodes(self, request: web.Request) -> web.Response:
        path = await self._admit(request, "nodes")
        local = self.storage / path
        if not local.is_symlink() and not local.exists():
            raise web.HTTPNotFound(text=f"NodeNotFound: {_uri(path)}")
        children = None
        if local.is_dir() and not local.is_symlink():
            children = sorted(local.iterdir(), key=lambda p: p.name)
            start = request.query.get("uri")
            if start:
                names = [child.name for child in children]
                wanted = urllib.parse.unquote(start.rsplit("/", 1)[-1])
                if not start.startswith(_uri(path) + "/") or wanted not in names:
                    raise web.HTTPBadRequest(text=f"InvalidURI: {start} is not a child")
                children = children[names.index(wanted) :]
            limit = request.query.get("limit")
            caps = [int(limit)] if limit else []
            caps += [self.page_cap] if self.page_cap is not None else []
            if caps:
                children = children[: min(caps)]
        body = node_document(self.storage, path, children)
        return web.Response(text=body, content_type="text/xml")

    async def files(self, request: web.Request) -> web.StreamResponse:
        path = await self._admit(request, "files")
        local = self.storage / path
        if local.is_symlink() or not local.is_file():
            raise web.HTTPNotFound(text=f"NodeNotFound: {_uri(path)}")
        response = web.StreamResponse(headers={"Content-Length": str(local.stat().st_size)})
        await response.prepare(request)
        with local.open("rb") as handle:
            while chunk := handle.read(1 << 16):
                try:
                    await response.write(chunk)
                except ConnectionError:
                    # The client had read all it wanted.
                    return response
                self.files_sent += len(chunk)
        return response

    def fetched(self) -> list[str]:
        """The paths of the files asked for, in order."""
        return [r.removeprefix("files/") for r in self.requests if r.startswith("files/")]

    def listed(self) -> list[str]:
        """The paths of the nodes listed (each page once), without their queries."""
        return [
            r.removeprefix("nodes/").split("?")[0] for r in self.requests if r.startswith("nodes/")
        ]


@contextlib.asynccontextmanager
async def vospace_stand_in(storage: Path) -> AsyncIterator[tuple[str, VOSpaceStandIn]]:
    """The service over ``storage``; yields its base URL and its state."""
    service = VOSpaceStandIn(storage)
    async with served(service.app()) as url:
        yield f"{url}/arc", service


@contextlib.asynccontextmanager
async def vospace_service(storage: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """The service over ``storage``; yields its base URL and the requests it answered."""
    async with vospace_stand_in(storage) as (url, service):
        yield url, service.requests
