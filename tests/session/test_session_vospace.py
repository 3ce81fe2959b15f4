"""Datasets read through a VOSpace 2 service with the user's token (a service on 127.0.0.1).

The pipeline runs with :class:`~casaspawner.session.vospace.VOSpaceReader` as its reader;
tests/spawners/test_spawners_mixin.py checks that the spawners give it the token of the login.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from support.datasets import dataset_in
from support.vospace import TOKEN, served, vospace_service

from casaspawner.catalog.model import Catalog, Release
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.worker import resolve_in_worker
from casaspawner.errors import CasaspawnerError
from casaspawner.plan import Identity, PlanConfig, SessionPlan, StorageLayout, Substitution
from casaspawner.session.prepare import prepare
from casaspawner.session.readers import DatasetReader, StorageMountReader
from casaspawner.session.settings import SessionSettings
from casaspawner.session.vospace import VOSpaceReader


@dataclass
class Steps:
    """The steps a spawner supplies, reading through ``reader``: alice (1001), in project proja."""

    catalog: Catalog
    reader: DatasetReader

    async def session_identity(self) -> Identity:
        return Identity("alice", 1001, 1001, groups=("proja",))

    def get_dataset_reader(self) -> DatasetReader:
        return self.reader

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        return await resolve_in_worker(target, label, self.catalog)

    def resolved(self, resolution: Resolution) -> None:
        pass

    async def substitute(self, release: Release) -> Substitution | None:
        return None

    async def blocked_release_messages(self) -> Mapping[str, str]:
        return {}


async def planned(catalog: Catalog, reader: DatasetReader, dataset: str) -> SessionPlan:
    """The plan for ``dataset``, read with ``reader``."""
    settings = SessionSettings(catalog, PlanConfig(), "medium")
    return await prepare({"dataset": dataset}, settings, Steps(catalog, reader))


def through(url: str, token: str = TOKEN) -> VOSpaceReader:
    return VOSpaceReader(url, StorageLayout(), token=token)


@pytest_asyncio.fixture(loop_scope="function")
async def vospace(storage: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """The VOSpace-like service over the storage tree: its URL and the requests it answered."""
    async with vospace_service(storage) as service:
        yield service


@pytest.mark.parametrize("era", ["cycle10", "cycle3-pipeline", "cycle2-manual"])
async def test_dataset_read_through_vospace(catalog, storage, vospace, era):
    url, requests = vospace
    (storage / "home/alice/data" / era).joinpath("big.fits").write_bytes(b"\0" * 4096)
    dataset = dataset_in(storage, "alice", era)
    mount = StorageMountReader(storage, StorageLayout())
    through_mount = await planned(catalog, mount, dataset)
    plan = await planned(catalog, through(url), f"~/{dataset}")
    assert (plan.release, plan.exact, plan.reason) == (
        through_mount.release,
        through_mount.exact,
        through_mount.reason,
    )
    assert plan.resolution.dataset == f"~/{dataset}"
    fetched = [r for r in requests if r.startswith("files/")]
    # Only what the resolver reads.
    assert fetched and not any(r.endswith(".fits") for r in fetched)
    assert all(r.startswith(("nodes/home/alice/", "files/home/alice/")) for r in requests)


async def test_vospace_paths_are_checked_and_links_not_followed(catalog, vospace):
    url, requests = vospace
    for text, expected in (
        ("/arc/home/bob/data", "is outside your storage"),
        ("data/../../bob", "may not contain '..'"),
        ("data/missing", "There is no dataset directory at 'home/alice/data/missing'"),
    ):
        with pytest.raises(CasaspawnerError) as info:
            await planned(catalog, through(url), text)
        assert expected in str(info.value)
    # A LinkNode is not a directory to read.
    with pytest.raises(CasaspawnerError):
        await planned(catalog, through(url), "escape")
    assert not any("bob" in r for r in requests)


@pytest_asyncio.fixture(loop_scope="function")
async def redirecting() -> AsyncIterator[tuple[str, list[str | None]]]:
    """A front on 127.0.0.1 redirecting (303) every request to a collector on 127.0.0.2.

    The collector records the Authorization header it was sent.
    """
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

    async with (
        served(collector, "127.0.0.2") as elsewhere,
        served(front_to(f"{elsewhere}/arc")) as front,
    ):
        yield f"{front}/arc", seen


async def test_token_never_follows_a_redirect_to_another_origin(catalog, storage, redirecting):
    url, seen = redirecting
    with pytest.raises(CasaspawnerError) as info:
        await planned(catalog, through(url), dataset_in(storage, "alice", "cycle10"))
    assert "There is no dataset directory" in str(info.value)
    # The redirect was followed, without the token.
    assert seen == [None]


async def test_token_follows_a_redirect_within_the_same_origin():
    """A redirect to another path of the same scheme, host and port keeps the token.

    Any other origin does not get it.
    """
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
        reader = through(f"{url}/old")
        assert await asyncio.to_thread(reader._get, "files", "home/alice/x.xml", 100) == b"data"
        assert seen == {"files/home/alice/x.xml": "Bearer tok-SECRET-42"}
