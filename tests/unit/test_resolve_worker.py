"""Resolution in a worker process: the same answers, bounded in time, CPU and memory.

The hub's event loop keeps answering while a hostile dataset is read: a task ticking every 10 ms
is never late by more than 100 ms.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from casaspawner.catalog.model import Catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import ERAS, DatasetSpec, write_dataset
from casaspawner.datasets.worker import WorkerLimits, resolve_in_worker
from casaspawner.errors import ArchiveUnavailable, InvalidInput, VersionUnknown


@pytest.mark.parametrize("era", sorted(ERAS))
def test_the_worker_resolves_each_era_as_the_hub_does(
    era: str, tmp_path: Path, catalog: Catalog
) -> None:
    member = write_dataset(tmp_path, era=era)
    try:
        expected = resolve_path(member, catalog, label="~/data")
    except VersionUnknown as exc:
        with pytest.raises(VersionUnknown) as caught:
            asyncio.run(resolve_in_worker(member, "~/data", catalog))
        assert (caught.value.finding, caught.value.advice) == (exc.finding, exc.advice)
        return
    assert asyncio.run(resolve_in_worker(member, "~/data", catalog)) == expected


def test_sentences_name_the_dataset_as_the_user_did(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    with pytest.raises(VersionUnknown) as caught:
        asyncio.run(resolve_in_worker(member, "~/mine", catalog))
    assert "~/mine" in str(caught.value) and "/tmp/casaspawner-" not in str(caught.value)


def test_an_identifier_without_an_archive_is_one_sentence(catalog: Catalog) -> None:
    with pytest.raises(ArchiveUnavailable, match="No ALMA archive is configured"):
        asyncio.run(resolve_in_worker("uid://A001/X1/X2", "uid://A001/X1/X2", catalog))


def versionless_manifests(member: Path, count: int = 4) -> None:
    """Manifests of 900,000 elements each and no versions: seconds of parsing, all of them read."""
    for index in range(count):
        (member / "script" / f"x{index}.pipeline_manifest.xml").write_text(
            "<a>" + "<x/>" * 900_000 + "</a>"
        )


async def lateness_while(work: asyncio.Future[object]) -> float:
    """The worst lateness, in seconds, of a 10 ms tick while ``work`` runs."""
    worst = 0.0
    while not work.done():
        before = time.monotonic()
        await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - before - 0.01)
    return worst


def test_the_event_loop_never_stalls_while_a_hostile_dataset_is_read(
    tmp_path: Path, catalog: Catalog
) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    versionless_manifests(member)
    limits = WorkerLimits(deadline=3, cpu_seconds=1)

    async def run() -> tuple[float, BaseException | None, float]:
        started = time.monotonic()
        work = asyncio.ensure_future(
            resolve_in_worker(member, "~/hostile", catalog, limits=limits)
        )
        worst = await lateness_while(work)
        return worst, work.exception(), time.monotonic() - started

    worst, error, took = asyncio.run(run())
    assert worst < 0.1, f"the event loop stalled for {worst:.3f} s"
    assert isinstance(error, InvalidInput) and "~/hostile" in str(error), error
    assert "\n" not in str(error) and took < limits.deadline + 1


def test_a_worker_past_its_deadline_is_killed_with_one_sentence(
    tmp_path: Path, catalog: Catalog
) -> None:
    member = write_dataset(tmp_path, spec=DatasetSpec(evidence=()))
    versionless_manifests(member)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"took longer than 0\.5 seconds"):
        asyncio.run(
            resolve_in_worker(
                member, "~/slow", catalog, limits=WorkerLimits(deadline=0.5, cpu_seconds=30)
            )
        )
    assert time.monotonic() - started < 2


def test_a_worker_over_its_memory_limit_is_one_sentence(tmp_path: Path, catalog: Catalog) -> None:
    member = write_dataset(tmp_path, era="cycle10")
    with pytest.raises(InvalidInput, match="more computing time or memory"):
        asyncio.run(
            resolve_in_worker(
                member, "~/small", catalog, limits=WorkerLimits(memory_bytes=40 << 20)
            )
        )
