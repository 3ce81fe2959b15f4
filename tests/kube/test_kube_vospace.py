"""Datasets read through a VOSpace 2 service with the user's token (a local service on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
import pytest_asyncio
from aiohttp import web
from conftest import dataset_in
from kube_support import FakeUser, auth_state

from casaspawner.spawners.errors import SpawnException

VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
XSI = "http://www.w3.org/2001/XMLSchema-instance"


@contextlib.asynccontextmanager
async def served(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `app` on a free port of `host`; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    await web.TCPSite(runner, host, port).start()
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def node_xml(root: Path, path: str) -> str | None:
    local = root / path
    if not local.is_dir() or local.is_symlink():
        return None

    def entry(child: Path) -> str:
        uri = quoteattr(f"vos://example.org~arc/{path}/{child.name}")
        if child.is_symlink():
            return f'<vos:node uri={uri} xsi:type="vos:LinkNode"><vos:target>vos://elsewhere</vos:target></vos:node>'
        if child.is_dir():
            return f'<vos:node uri={uri} xsi:type="vos:ContainerNode"/>'
        size = child.stat().st_size
        prop = f'<vos:property uri="ivo://ivoa.net/vospace/core#length">{size}</vos:property>'
        return (
            f'<vos:node uri={uri} xsi:type="vos:DataNode"><vos:properties>{prop}</vos:properties></vos:node>'
        )

    children = "".join(entry(child) for child in sorted(local.iterdir()))
    uri = quoteattr(f"vos://example.org~arc/{path}")
    return (
        f'<vos:node xmlns:vos="{VOS}" xmlns:xsi="{XSI}" uri={uri} xsi:type="vos:ContainerNode">'
        f"<vos:nodes>{children}</vos:nodes></vos:node>"
    )


@pytest_asyncio.fixture(loop_scope="function")
async def vospace(storage):
    """A VOSpace-like service over the storage tree that wants alice's token."""
    requests: list[str] = []

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != "Bearer tok-SECRET-42":
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


@pytest.mark.parametrize("era", ["cycle10", "cycle3-pipeline", "cycle2-manual"])
async def test_dataset_read_through_vospace(make_spawner, storage, vospace, era):
    url, requests = vospace
    (storage / "home/alice/data" / era).joinpath("big.fits").write_bytes(b"\0" * 4096)
    dataset = dataset_in(storage, "alice", era)
    through_mount = await make_spawner().prepare_session({"dataset": dataset})
    spawner = make_spawner(storage_hub_path=None, vospace_url=url)
    plan = await spawner.prepare_session({"dataset": f"~/{dataset}"})
    assert (plan.release, plan.exact, plan.reason) == (
        through_mount.release,
        through_mount.exact,
        through_mount.reason,
    )
    assert plan.resolution.dataset == f"~/{dataset}"
    fetched = [r for r in requests if r.startswith("files/")]
    assert fetched and not any(r.endswith(".fits") for r in fetched)  # only what the resolver reads
    assert all(r.startswith(("nodes/home/alice/", "files/home/alice/")) for r in requests)


async def test_vospace_paths_are_checked_and_links_not_followed(make_spawner, storage, vospace):
    url, requests = vospace
    spawner = make_spawner(storage_hub_path=None, vospace_url=url)
    for text, expected in (
        ("/arc/home/bob/data", "is outside your storage"),
        ("data/../../bob", "may not contain '..'"),
        ("data/missing", "There is no dataset directory at 'home/alice/data/missing'"),
    ):
        with pytest.raises(SpawnException) as info:
            await spawner.prepare_session({"dataset": text})
        assert expected in info.value.jupyterhub_message
    with pytest.raises(SpawnException):
        await spawner.prepare_session({"dataset": "escape"})  # a LinkNode is not a directory to read
    assert not any("bob" in r for r in requests)


async def test_vospace_needs_the_users_token(make_spawner, storage, vospace):
    url, _ = vospace
    spawner = make_spawner(
        FakeUser(auth_state=auth_state(token="wrong")), storage_hub_path=None, vospace_url=url
    )
    with pytest.raises(SpawnException) as info:
        await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert info.value.jupyterhub_message.endswith("(HTTP 401).")


@pytest_asyncio.fixture(loop_scope="function")
async def redirecting():
    """A front on 127.0.0.1 redirecting (303) every request to a collector on 127.0.0.2, which records the
    Authorization header it was sent."""
    seen: list[str | None] = []

    async def collect(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        raise web.HTTPNotFound()

    collector = web.Application()
    collector.router.add_get("/{tail:.*}", collect)

    def front_to(target: str) -> web.Application:
        async def front(request: web.Request) -> web.Response:
            raise web.HTTPSeeOther(f"{target}/{request.match_info['tail']}")

        app = web.Application()
        app.router.add_get("/arc/{tail:.*}", front)
        return app

    async with served(collector, "127.0.0.2") as elsewhere, served(front_to(f"{elsewhere}/arc")) as front:
        yield f"{front}/arc", seen


async def test_token_never_follows_a_redirect_to_another_origin(make_spawner, storage, redirecting):
    url, seen = redirecting
    spawner = make_spawner(storage_hub_path=None, vospace_url=url)
    with pytest.raises(SpawnException) as info:
        await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert "There is no dataset directory" in info.value.jupyterhub_message
    assert seen == [None]  # the redirect was followed, without the token


async def test_token_follows_a_redirect_within_the_same_origin():
    """A redirect to another path of the same scheme, host and port keeps the token; any other origin not."""
    from casaspawner.plan import StorageLayout
    from casaspawner.session.vospace import VOSpaceReader

    seen: dict[str, str | None] = {}

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(f"/new/{request.match_info['tail']}")

    async def new(request: web.Request) -> web.Response:
        seen[request.match_info["tail"]] = request.headers.get("Authorization")
        return web.Response(body=b"data")

    app = web.Application()
    app.router.add_get("/old/{tail:.*}", moved)
    app.router.add_get("/new/{tail:.*}", new)
    async with served(app) as url:
        reader = VOSpaceReader(f"{url}/old", StorageLayout(), token="tok-SECRET-42")
        assert await asyncio.to_thread(reader._get, "files", "home/alice/x.xml", 100) == b"data"
        assert seen == {"files/home/alice/x.xml": "Bearer tok-SECRET-42"}
