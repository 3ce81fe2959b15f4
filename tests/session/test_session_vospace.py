"""Datasets read through a VOSpace 2.1 service on 127.0.0.1, with the user's token.

The service (tests/support/vospace.py) answers with VOSpace 2.1 node documents shaped as
Cavern's; its docstring names the sources. The pipeline runs with
:class:`~casaspawner.session.vospace.VOSpaceReader` as its reader, and what it resolves is
compared with a read of the same tree through the storage mount;
tests/spawners/test_spawners_mixin.py checks that the spawners give it the token of the login.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from support.datasets import dataset_in
from support.vospace import TOKEN, VOSpaceStandIn, served, vospace_stand_in

from casaspawner.catalog.model import Catalog, Release
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.resolve import read_evidence, resolve_path
from casaspawner.datasets.synth import ERAS, DatasetSpec, write_dataset
from casaspawner.datasets.worker import resolve_in_worker
from casaspawner.errors import CasaspawnerError, VersionUnknown
from casaspawner.plan import Identity, PlanConfig, SessionPlan, StorageLayout, Substitution
from casaspawner.session.prepare import prepare
from casaspawner.session.readers import DatasetReader, StorageMountReader
from casaspawner.session.settings import SessionSettings
from casaspawner.session.vospace import Probe, VOSpaceBudget, VOSpaceReader, tells_version

ALICE = Identity("alice", 1001, 1001, groups=("proja",))


@dataclass
class Steps:
    """The steps a spawner supplies, reading through ``reader``: alice (1001), in project proja."""

    catalog: Catalog
    reader: DatasetReader

    async def session_identity(self) -> Identity:
        return ALICE

    def get_dataset_reader(self) -> DatasetReader:
        return self.reader

    async def kept_resolution(
        self, reader: DatasetReader, text: str, identity: Identity
    ) -> Resolution | None:
        return None

    async def read_dataset(self, target: Path | str, label: str, identity: Identity) -> Resolution:
        return await resolve_in_worker(target, label, self.catalog)

    def resolved(self, resolution: Resolution) -> None:
        pass

    async def substitute(self, release: Release) -> Substitution | None:
        return None

    async def blocked_release_messages(self) -> Mapping[str, str]:
        return {}

    async def measures_version(self, earlier: str | None) -> str | None:
        return None


async def planned(
    catalog: Catalog, reader: DatasetReader, dataset: str, **options: str
) -> SessionPlan:
    """The plan for ``dataset``, read with ``reader``."""
    settings = SessionSettings(catalog, PlanConfig(), "medium")
    return await prepare({"dataset": dataset, **options}, settings, Steps(catalog, reader))


class Probes:
    """A probe in this process, with the resolver's readers; it counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, path: Path) -> bool:
        self.calls += 1
        try:
            read_evidence(path)
        except VersionUnknown:
            return False
        return True


def through(
    url: str,
    token: str = TOKEN,
    *,
    probe: Probe | None = None,
    budget: VOSpaceBudget | None = None,
    page: int = 1000,
    timeout: float = 60.0,
) -> VOSpaceReader:
    return VOSpaceReader(
        url,
        StorageLayout(),
        token=token,
        probe=probe,
        budget=budget or VOSpaceBudget(),
        page=page,
        timeout=timeout,
    )


async def outcome(catalog: Catalog, reader: DatasetReader, text: str) -> str:
    """What the resolver, in this process, makes of ``text`` read with ``reader``."""
    try:
        async with reader.open(text, ALICE) as path:
            resolution = resolve_path(path, catalog, label=text)
    except CasaspawnerError as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"{resolution.release.id} {resolution.exact} {resolution.reason}"


def mount(storage: Path) -> StorageMountReader:
    return StorageMountReader(storage, StorageLayout())


@pytest_asyncio.fixture(loop_scope="function")
async def vospace(storage: Path) -> AsyncIterator[tuple[str, VOSpaceStandIn]]:
    """The VOSpace service over the storage tree: its URL and its state."""
    async with vospace_stand_in(storage) as service:
        yield service


@pytest.fixture(scope="module")
def eras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice's datasets of every era; one log's name has spaces."""
    root = tmp_path_factory.mktemp("eras")
    for era in ERAS:
        write_dataset(root / "home" / "alice" / era, era)
    log = next((root / "home/alice/log-only").rglob("casa*.log"))
    log.rename(log.with_name("casa 2016 11 02.log"))
    return root


def member(storage: Path, top: str) -> str:
    """The member directory below ``home/alice/top``, as alice types it."""
    found = next((storage / "home/alice" / top).rglob("member.uid___*"))
    return str(found.relative_to(storage / "home/alice"))


@pytest.mark.parametrize("era", sorted(ERAS))
async def test_every_era_resolves_as_through_the_mount(catalog, eras, era):
    """The same answer, or sentence, as through the storage mount."""
    async with vospace_stand_in(eras) as (url, service):
        for text in (era, member(eras, era)):
            assert await outcome(catalog, through(url, probe=Probes()), text) == await outcome(
                catalog, mount(eras), text
            )
    assert all(r.startswith(("nodes/home/alice/", "files/home/alice/")) for r in service.requests)


@pytest.mark.parametrize("era", ["cycle10", "cycle3-pipeline", "cycle2-manual"])
async def test_dataset_read_through_vospace(catalog, storage, vospace, era):
    """The whole pipeline, probes and resolution in worker processes, as through the mount."""
    url, service = vospace
    (storage / "home/alice/data" / era).joinpath("big.fits").write_bytes(b"\0" * 4096)
    dataset = dataset_in(storage, "alice", era)
    through_mount = await planned(catalog, mount(storage), dataset)
    plan = await planned(catalog, through(url), f"~/{dataset}")
    assert (plan.release, plan.exact, plan.reason) == (
        through_mount.release,
        through_mount.exact,
        through_mount.reason,
    )
    assert plan.resolution.dataset == f"~/{dataset}"
    assert service.fetched() and not any(r.endswith(".fits") for r in service.fetched())
    assert all(r.startswith(("nodes/home/alice/", "files/home/alice/")) for r in service.requests)


def junk(directory: Path, count: int, size: int) -> int:
    """Write ``count`` files the old reader fetched (``*.xml``, ``*.log``, ``*.py``, ``*.tgz``)."""
    directory.mkdir(parents=True, exist_ok=True)
    suffixes = ("xml", "log", "py", "weblog.tgz")
    for index in range(count):
        (directory / f"junk{index:03}.{suffixes[index % 4]}").write_bytes(os.urandom(size))
    return count * size


async def test_only_the_files_the_resolver_opens_are_fetched(catalog, tmp_path):
    """Among hundreds of junk files, the manifest alone is fetched.

    Only the MOUS's evidence directories are listed. (The reader before this one fetched every
    ``*.xml``, ``*.log``, ``*.py`` and ``*.weblog.tgz`` of the tree.)
    """
    mous = write_dataset(tmp_path / "home/alice/big", "cycle10")
    spent = junk(mous / "product", 120, 64 << 10)
    spent += junk(mous / "calibration" / "deep" / "deeper", 120, 64 << 10)
    spent += junk(mous / "qa" / "extra", 60, 64 << 10)
    manifest = next(mous.glob("script/*pipeline_manifest.xml"))
    probes = Probes()
    async with vospace_stand_in(tmp_path) as (url, service):
        text = str(mous.relative_to(tmp_path / "home/alice"))
        assert (await outcome(catalog, through(url, probe=probes), text)).startswith(
            "pl-2023.1.0.124 True"
        )
    assert service.fetched() == [str(manifest.relative_to(tmp_path))]
    assert service.files_sent == manifest.stat().st_size < spent // 1000
    below = {p.removeprefix(f"home/alice/{text}").strip("/") for p in service.listed()}
    assert {p.split("/")[-1] for p in below} <= {
        "",
        "script",
        "qa",
        "log",
        "calibration",
        "product",
    }
    # One probe: the manifest told the version; the pipeline's own run is not a probe.
    assert probes.calls == 1


async def test_evidence_is_fetched_kind_by_kind_in_almas_order(catalog, tmp_path):
    """A manifest without versions, then the packed weblog: scripts and logs stay unread."""
    spec = DatasetSpec(
        "2015.1.00306.S",
        "uid___A001_X2de_X84",
        "4.5.3-REL (r36115)",
        "36660M (Pipeline-Cycle3-R4-B)",
        ("manifest-noversion", "weblog-tgz", "script", "casalog"),
    )
    mous = write_dataset(tmp_path / "home/alice/c3", spec=spec)
    probes = Probes()
    async with vospace_stand_in(tmp_path) as (url, service):
        text = str(mous.relative_to(tmp_path / "home/alice"))
        through_vospace = await outcome(catalog, through(url, probe=probes), text)
    assert through_vospace == await outcome(catalog, mount(tmp_path), text)
    assert [Path(f).name for f in service.fetched()] == [
        f"member.{spec.mous}.hifa_calimage.pipeline_manifest.xml",
        f"member.{spec.mous}.hifa_calimage.weblog.tgz",
    ]
    # After the manifest (no versions), after the packed weblog (found).
    assert probes.calls == 2


def weblog_tgz_only(root: Path, spec_name: str = "cycle3-pipeline") -> Path:
    spec = ERAS[spec_name]
    return write_dataset(
        root,
        spec=DatasetSpec(
            spec.project, spec.mous, spec.casa, spec.pipeline, ("manifest-noversion", "weblog-tgz")
        ),
    )


async def test_the_budget_refuses_in_one_sentence(catalog, tmp_path):
    mous = weblog_tgz_only(tmp_path / "home/alice/c3")
    tgz = next(mous.glob("qa/*.weblog.tgz"))
    # Padding the archive past the budget (it is refused by its length, never read).
    with tgz.open("ab") as handle:
        handle.write(os.urandom(3 << 20))
    text = str(mous.relative_to(tmp_path / "home/alice"))
    small = VOSpaceBudget(bytes=1 << 20)
    async with vospace_stand_in(tmp_path) as (url, service):
        with pytest.raises(VersionUnknown) as info:
            async with through(url, probe=Probes(), budget=small).open(text, ALICE):
                pass
        assert str(info.value) == (
            f"Nothing this hub read of {text} tells its CASA version, and reading on would mean "
            "fetching its packed weblog "
            f"qa/member.{ERAS['cycle3-pipeline'].mous}.hifa_calimage.weblog.tgz (4 MiB), past "
            "the 1 MiB this hub reads from storage for one dataset; "
            "choose a CASA release yourself."
        )
        assert not any(f.endswith(".tgz") for f in service.fetched())
        # A release the user chose runs all the same.
        chosen = catalog.releases[-1]
        plan = await planned(catalog, through(url, budget=small), text, release=chosen.id)
        assert plan.release == chosen and not plan.exact


async def test_what_was_fetched_before_the_budget_ran_out_may_decide(catalog, tmp_path):
    """Two packed weblogs: the first tells the version, the second would not fit."""
    mous = weblog_tgz_only(tmp_path / "home/alice/c3")
    first = next(mous.glob("qa/*.weblog.tgz"))
    second = first.with_name("zz_" + first.name)
    second.write_bytes(os.urandom(3 << 20))
    text = str(mous.relative_to(tmp_path / "home/alice"))
    async with vospace_stand_in(tmp_path) as (url, service):
        reader = through(url, probe=Probes(), budget=VOSpaceBudget(bytes=1 << 20))
        assert await outcome(catalog, reader, text) == await outcome(
            catalog, mount(tmp_path), text
        )
    assert not any(f.endswith("zz_" + first.name) for f in service.fetched())


async def test_calibration_scripts_all_vote_or_none(catalog, tmp_path):
    """Scripts decide by majority: over the file budget, none decides alone."""
    mous = write_dataset(tmp_path / "home/alice/manual", "cycle4-manual")
    script = next(mous.glob("script/*.scriptForCalibration.py"))
    for index in range(4):
        script.with_name(f"uid___A002_X{index}_X1.ms.scriptForCalibration.py").write_text(
            script.read_text()
        )
    text = str(mous.relative_to(tmp_path / "home/alice"))
    async with vospace_stand_in(tmp_path) as (url, _):
        message = await outcome(
            catalog, through(url, probe=Probes(), budget=VOSpaceBudget(files=3)), text
        )
        assert message.endswith(
            "reading on would mean fetching more than the 3 files this hub reads from storage "
            "for one dataset; choose a CASA release yourself."
        )
        assert await outcome(catalog, through(url, probe=Probes()), text) == await outcome(
            catalog, mount(tmp_path), text
        )


async def test_a_tree_too_wide_to_find_its_mous_is_refused(catalog, tmp_path):
    for group in range(6):
        (tmp_path / "home/alice/wide" / f"group{group}" / "sub").mkdir(parents=True)
    async with vospace_stand_in(tmp_path) as (url, _):
        message = await outcome(
            catalog, through(url, probe=Probes(), budget=VOSpaceBudget(listings=4)), "wide"
        )
    assert message == (
        "InvalidInput: 'wide' holds too many files to be one ALMA dataset; "
        "give its member directory."
    )


async def test_a_file_too_large_to_be_evidence_is_not_fetched(catalog, tmp_path):
    """A 40 MiB manifest, refused by its size, is never fetched.

    The AQUA report decides, with the same words as through the mount.
    """
    spec = ERAS["cycle11"]
    mous = write_dataset(
        tmp_path / "home/alice/c11",
        spec=DatasetSpec(
            spec.project, spec.mous, spec.casa, spec.pipeline, ("manifest", "aquareport")
        ),
    )
    manifest = next(mous.glob("script/*pipeline_manifest.xml"))
    with manifest.open("r+b") as handle:
        handle.truncate(40 << 20)
    text = str(mous.relative_to(tmp_path / "home/alice"))
    async with vospace_stand_in(tmp_path) as (url, service):
        through_vospace = await outcome(catalog, through(url, probe=Probes()), text)
    assert through_vospace == await outcome(catalog, mount(tmp_path), text)
    assert "AQUA report" in through_vospace or "aquareport" in through_vospace.lower()
    assert not any(f.endswith("pipeline_manifest.xml") for f in service.fetched())
    assert service.files_sent < 1 << 20


async def test_listings_are_paged(catalog, tmp_path):
    """Pages of two children find what one page does."""
    mous = write_dataset(tmp_path / "home/alice/paged", "cycle9")
    for index in range(5):
        (mous / "script" / f"aaa{index}.txt").write_text("not evidence\n")
    text = "paged"
    async with vospace_stand_in(tmp_path) as (url, service):
        paged = await outcome(catalog, through(url, probe=Probes(), page=2), text)
    assert paged == await outcome(catalog, mount(tmp_path), text)
    script = [
        r for r in service.requests if r.startswith(f"nodes/{mous.relative_to(tmp_path)}/script?")
    ]
    assert len(script) >= 4 and all("limit=2" in r for r in script)
    # Each page goes on from the last child of the one before (itself repeated, and dropped).
    assert all(
        f"uri=vos://example.org~arc/{mous.relative_to(tmp_path)}/script/" in r for r in script[1:]
    )


async def test_links_are_never_followed(catalog, storage, tmp_path):
    """Link nodes are passed over, and nothing of bob's is asked for.

    Links inside the dataset are passed over as through the mount; a link as the dataset is not
    a directory.
    """
    mous = write_dataset(tmp_path / "home/alice/linked", "cycle3-pipeline")
    bob = write_dataset(tmp_path / "home/bob/data", "cycle8")
    for manifest in mous.glob("script/*pipeline_manifest.xml"):
        manifest.unlink()
    (mous / "script" / "member.uid___A001_X1_X1.hifa_calimage.pipeline_manifest.xml").symlink_to(
        next(bob.glob("script/*pipeline_manifest.xml"))
    )
    shutil.rmtree(mous / "log")
    (mous / "log").symlink_to(bob / "script")
    (tmp_path / "home/alice/escape").symlink_to(tmp_path / "home/bob/data")
    text = str(mous.relative_to(tmp_path / "home/alice"))
    async with vospace_stand_in(tmp_path) as (url, service):
        assert await outcome(catalog, through(url, probe=Probes()), text) == await outcome(
            catalog, mount(tmp_path), text
        )
        assert await outcome(catalog, through(url, probe=Probes()), "escape") == (
            "InvalidInput: 'home/alice/escape' in your storage is not a directory."
        )
    assert not any("bob" in r for r in service.requests)


async def test_vospace_paths_are_checked(catalog, vospace):
    url, service = vospace
    for text, expected in (
        ("/arc/home/bob/data", "is outside your storage"),
        ("data/../../bob", "may not contain '..'"),
        ("data/missing", "There is no dataset directory at 'home/alice/data/missing'"),
    ):
        with pytest.raises(CasaspawnerError) as info:
            await planned(catalog, through(url), text)
        assert expected in str(info.value)
    assert not any("bob" in r for r in service.requests)


async def test_the_probe_runs_the_resolver_in_a_worker(catalog, tmp_path):
    """Evidence, even of an unbuilt version, is a yes; none is a no."""
    found = write_dataset(tmp_path / "found", "cycle10")
    none = write_dataset(tmp_path / "none", "no-evidence")
    unbuilt = write_dataset(
        tmp_path / "unbuilt",
        spec=DatasetSpec("2015.1.00001.S", "uid___A001_X2de_X99", "4.4.0", None, ("script",)),
    )
    with pytest.raises(VersionUnknown, match="no public"):
        resolve_path(unbuilt, catalog)
    assert [await tells_version(p) for p in (found, none, unbuilt)] == [True, False, True]


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


async def test_token_follows_a_redirect_within_the_same_origin(catalog, storage):
    """A redirect within the same origin keeps the token.

    The front redirects to another path of its own origin; the service, which wants the token,
    answers every request, so the dataset resolves.
    """
    service = VOSpaceStandIn(storage)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(f"/arc/{request.match_info['tail']}?{request.query_string}")

    app = service.app()
    app.router.add_get("/front/{tail:.*}", moved)
    async with served(app) as url:
        reader = through(f"{url}/front", probe=Probes())
        text = dataset_in(storage, "alice", "cycle10")
        assert (await outcome(catalog, reader, text)).startswith("pl-2023.1.0.124 True")
    assert service.fetched()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            403,
            "PermissionDenied",
            "Your storage service refused to list or read 'home/alice/data' (HTTP 403).",
        ),
        (
            500,
            "InternalFault",
            "Your storage service answered HTTP 500 for 'home/alice/data'; try again in a moment.",
        ),
        (
            200,
            "<html><body>Maintenance</body></html>",
            "Your storage service answered with something that is not a VOSpace node.",
        ),
        (
            200,
            '<!DOCTYPE n [<!ENTITY e "x">]><n>&e;</n>',
            "Your storage service answered with something that is not a VOSpace node.",
        ),
    ],
)
async def test_service_faults_are_one_sentence(catalog, status, body, expected):
    async def fault(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/arc/{tail:.*}", fault)
    async with served(app) as url:
        assert await outcome(catalog, through(f"{url}/arc"), "data") == f"InvalidInput: {expected}"


async def test_a_slow_or_absent_service_is_one_sentence(catalog, storage, vospace):
    url, service = vospace
    service.delay = 1.0
    started = time.monotonic()
    assert await outcome(catalog, through(url, timeout=0.5), "data") == (
        "InvalidInput: Your storage service did not answer within 0.5 seconds; "
        "try again in a moment."
    )
    assert time.monotonic() - started < 0.9
    assert await outcome(catalog, through("http://127.0.0.1:9/arc"), "data") == (
        "InvalidInput: Your storage service could not be reached; try again in a moment."
    )
