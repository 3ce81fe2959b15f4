"""A VOSpace 2-like service over a storage tree, on 127.0.0.1, that wants alice's token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

from aiohttp import web

from casaspawner.net import free_port

VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
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


def node_xml(root: Path, path: str) -> str | None:
    """The VOSpace node of the directory ``root/path`` with its children, None if there is none."""
    local = root / path
    if not local.is_dir() or local.is_symlink():
        return None

    def entry(child: Path) -> str:
        uri = quoteattr(f"vos://example.org~arc/{path}/{child.name}")
        if child.is_symlink():
            target = "<vos:target>vos://elsewhere</vos:target>"
            return f'<vos:node uri={uri} xsi:type="vos:LinkNode">{target}</vos:node>'
        if child.is_dir():
            return f'<vos:node uri={uri} xsi:type="vos:ContainerNode"/>'
        size = child.stat().st_size
        prop = f'<vos:property uri="ivo://ivoa.net/vospace/core#length">{size}</vos:property>'
        properties = f"<vos:properties>{prop}</vos:properties>"
        return f'<vos:node uri={uri} xsi:type="vos:DataNode">{properties}</vos:node>'

    children = "".join(entry(child) for child in sorted(local.iterdir()))
    uri = quoteattr(f"vos://example.org~arc/{path}")
    return (
        f'<vos:node xmlns:vos="{VOS}" xmlns:xsi="{XSI}" uri={uri} xsi:type="vos:ContainerNode">'
        f"<vos:nodes>{children}</vos:nodes></vos:node>"
    )


@contextlib.asynccontextmanager
async def vospace_service(storage: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """The service over ``storage``; yields its base URL and the requests it answered."""
    requests: list[str] = []

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized()

    async def nodes(request: web.Request) -> web.Response:
        authorized(request)
        requests.append(f"nodes/{request.match_info['path']}")
        xml = node_xml(storage, request.match_info["path"])
        if xml is None:
            raise web.HTTPNotFound()
        return web.Response(text=xml, content_type="text/xml")

    async def files(request: web.Request) -> web.Response:
        authorized(request)
        requests.append(f"files/{request.match_info['path']}")
        local = storage / request.match_info["path"]
        if not local.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=local.read_bytes())

    app = web.Application()
    app.router.add_get("/arc/nodes/{path:.*}", nodes)
    app.router.add_get("/arc/files/{path:.*}", files)
    async with served(app) as url:
        yield f"{url}/arc", requests
