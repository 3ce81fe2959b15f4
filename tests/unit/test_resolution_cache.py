"""The hub's resolution cache: a hit starts no worker, and any change below the dataset misses.

A hit is shown by a worker that cannot start (its Python does not exist): only an answer from the
cache can come back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from casaspawner.catalog.model import Catalog
from casaspawner.datasets.cache import ResolutionCache, parse_footprint
from casaspawner.datasets.model import Resolution
from casaspawner.datasets.synth import DatasetSpec, manifest_xml, write_dataset
from casaspawner.datasets.worker import resolve_in_worker

#: A worker started with this Python fails at once, so an answer means the cache answered.
NO_WORKER = "/nonexistent/python3"
SPEC = DatasetSpec(casa="6.5.4.9", pipeline="2023.1.0.124")


def resolve(
    target: Path, catalog: Catalog, cache: ResolutionCache, python: str | None = None
) -> Resolution:
    extra = {} if python is None else {"python": python}
    return asyncio.run(resolve_in_worker(target, "~/data", catalog, cache=cache, **extra))


@pytest.fixture
def member(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", spec=SPEC)


@pytest.fixture
def cache() -> ResolutionCache:
    # Stamps written before the worker started are trusted at once (see test_fresh_files_...).
    return ResolutionCache(settle=0)


def manifest_of(member: Path) -> Path:
    return next(member.rglob("*pipeline_manifest.xml"))


def test_an_unchanged_dataset_is_answered_without_a_worker(
    member: Path, catalog: Catalog, cache: ResolutionCache
) -> None:
    first = resolve(member, catalog, cache)
    assert len(cache) == 1 and cache.misses == 1
    again = resolve(member, catalog, cache, python=NO_WORKER)
    assert again == first and cache.hits == 1


def test_the_same_answer_comes_under_the_name_the_user_gives(
    member: Path, catalog: Catalog, cache: ResolutionCache
) -> None:
    resolve(member, catalog, cache)
    # Another name is another key: the worker must run (and cannot).
    with pytest.raises(OSError):
        asyncio.run(resolve_in_worker(member, "~/other", catalog, cache=cache, python=NO_WORKER))


def test_a_rewritten_evidence_file_is_read_again(
    member: Path, catalog: Catalog, cache: ResolutionCache
) -> None:
    first = resolve(member, catalog, cache)
    newer = DatasetSpec(casa="6.6.1.17", pipeline="2024.1.0.8")
    manifest_of(member).write_text(manifest_xml(newer))
    again = resolve(member, catalog, cache)
    assert cache.hits == 0 and cache.misses == 2
    assert first.release.id != again.release.id
    assert again.evidence.casa is not None and again.evidence.casa.startswith("6.6.1")


@pytest.mark.parametrize("change", ["touch", "chmod", "new-file", "rename", "remove"])
def test_any_change_below_the_dataset_misses(
    change: str, member: Path, catalog: Catalog, cache: ResolutionCache
) -> None:
    resolve(member, catalog, cache)
    manifest = manifest_of(member)
    if change == "touch":
        os.utime(manifest, (1, 1))
    elif change == "chmod":
        manifest.chmod(0o600)
    elif change == "new-file":
        (
            manifest.parent / "member.uid___A001_X1_X2.hifa_calimage.pipeline_manifest.xml"
        ).write_text(manifest.read_text())
    elif change == "rename":
        manifest.rename(manifest.with_name("old.xml"))
    else:
        manifest.unlink()
    with pytest.raises(OSError):
        resolve(member, catalog, cache, python=NO_WORKER)
    assert cache.hits == 0


def test_a_directory_swapped_for_a_link_misses(
    member: Path, catalog: Catalog, cache: ResolutionCache, tmp_path: Path
) -> None:
    resolve(member, catalog, cache)
    script = manifest_of(member).parent
    moved = tmp_path / "elsewhere"
    shutil.move(script, moved)
    script.symlink_to(moved)
    with pytest.raises(OSError):
        resolve(member, catalog, cache, python=NO_WORKER)


def test_another_catalog_is_not_answered_from_the_cache(
    member: Path, catalog: Catalog, cache: ResolutionCache
) -> None:
    first = resolve(member, catalog, cache)
    # An equal catalog (an operator's file read again) is the same catalog.
    equal = replace(catalog)
    assert equal is not catalog
    assert resolve(member, equal, cache, python=NO_WORKER).release is equal.get(first.release.id)
    # One without the release the dataset resolved to is another.
    fewer = replace(catalog, releases=tuple(r for r in catalog.releases if r != first.release))
    with pytest.raises(OSError):
        resolve(member, fewer, cache, python=NO_WORKER)


def test_fresh_files_are_not_trusted(member: Path, catalog: Catalog) -> None:
    # Written less than two seconds ago: a second write within a clock tick keeps the stamps.
    cache = ResolutionCache(settle=2.0)
    resolve(member, catalog, cache)
    assert len(cache) == 0


def test_errors_are_not_kept(tmp_path: Path, catalog: Catalog, cache: ResolutionCache) -> None:
    member = write_dataset(tmp_path / "data", spec=DatasetSpec(evidence=()))
    with pytest.raises(Exception, match="~/data"):
        resolve(member, catalog, cache)
    assert len(cache) == 0


def test_the_oldest_entry_leaves_first(tmp_path: Path, catalog: Catalog) -> None:
    cache = ResolutionCache(size=2, settle=0)
    members = [write_dataset(tmp_path / f"d{i}", spec=SPEC) for i in range(3)]
    for member in members:
        resolve(member, catalog, cache)
    assert len(cache) == 2
    with pytest.raises(OSError):
        resolve(members[0], catalog, cache, python=NO_WORKER)
    resolve(members[2], catalog, cache, python=NO_WORKER)


STAMP = [1, 2, 0o40755, 0, 0, 4096, 1, 1]
FILE = [1, 3, 0o100644, 0, 0, 10, 1, 1]


@pytest.mark.parametrize(
    "footprint",
    [
        [],
        [[".", FILE]],
        [[".", STAMP], ["../etc/passwd", FILE]],
        [[".", STAMP], ["/etc/passwd", FILE]],
        [[".", STAMP], ["a//b", FILE]],
        [[".", STAMP], ["a/b", FILE]],
        [[".", STAMP], ["a", FILE], ["a/b", FILE]],
        [[".", STAMP], ["a", [1, 2, 3]]],
        [[".", STAMP], ["a", [1.0, 2, 3, 4, 5, 6, 7, 8]]],
        [[".", STAMP]] + [[f"f{i}", FILE] for i in range(300)],
        "not a footprint",
    ],
)
def test_a_footprint_that_walks_out_or_skips_a_directory_is_refused(footprint: object) -> None:
    assert parse_footprint(footprint) is None


def test_a_footprint_is_checked_parents_first() -> None:
    checked = parse_footprint([["a/b", FILE], ["a", STAMP], [".", STAMP]])
    assert checked is not None and [path for path, _ in checked] == [".", "a", "a/b"]
