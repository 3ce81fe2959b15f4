from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from casaspawner.catalog import Catalog, load_catalog, parse_catalog
from casaspawner.catalog.model import _bundled_catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import DatasetSpec, write_dataset
from casaspawner.errors import CatalogError

BUNDLED = Path(__file__).resolve().parents[2] / "casaspawner" / "catalog" / "releases.yaml"


def raw() -> dict:
    return yaml.safe_load(BUNDLED.read_text())


def test_every_pipeline_cycle_2_to_12_has_a_runnable_release(catalog: Catalog) -> None:
    for cycle in range(2, 13):
        releases = [r for r in catalog.releases if r.role == "pipeline" and cycle in r.cycles]
        assert releases, f"no pipeline release for Cycle {cycle}"
        assert any(catalog.public_release_for(r).available for r in releases)


def test_manual_casa_of_cycles_0_to_4(catalog: Catalog) -> None:
    manual_cycles = {c for r in catalog.releases if r.role == "manual" for c in r.cycles}
    assert {0, 1, 2} <= manual_cycles
    for version in ("3.4.0", "4.0.0", "4.1.0", "4.2.2", "4.5.0", "4.7.2"):
        assert any(r.casa == version and r.available for r in catalog.releases), version


def test_internal_builds_map_to_their_public_restore_build(catalog: Catalog) -> None:
    internal = catalog.get("pl-r42030")
    assert (internal.casa, internal.available) == ("5.4.0-68", False)
    assert catalog.public_release_for(internal).casa == "5.4.0-70"
    assert catalog.public_release_for(catalog.get("pl-2020.1.0.36")).id == "pl-2020.1.0.40"


def test_alma_builds_stay_apart_from_vla_builds(catalog: Catalog) -> None:
    for vla in ("2024.1.1.22", "2023.0.0.36", "2021.1.1.3", "r42192"):
        assert catalog.is_non_alma_pipeline(vla)
        assert not catalog.with_pipeline(vla)
    assert not catalog.is_non_alma_pipeline("2024.1.0.8")


def test_every_release_is_sourced_and_tagged_uniquely(catalog: Catalog) -> None:
    tags = [r.tag for r in catalog.releases]
    assert len(tags) == len(set(tags))
    for release in catalog.releases:
        assert release.sources, release.id
        assert release.confidence in {"confirmed", "secondary", "unconfirmed", "planned"}
        if release.tarball:
            assert release.tarball.url.startswith("https://") and release.tarball.url.endswith(
                release.tarball.name
            )


def test_latest_pipeline_is_the_newest_published_one(catalog: Catalog) -> None:
    assert catalog.latest_pipeline().id == "pl-2025.1.0.36"


def test_bundled_catalog_is_cached() -> None:
    assert load_catalog() is load_catalog() is _bundled_catalog()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["releases"][3].update(casa="6.5"), "release 'pl-r36091', field 'casa'"),
        (lambda d: d["releases"][3].update(casa="6.5.4.9"), "must be written '6.5.4-9'"),
        (lambda d: d["releases"][3].update(role="vla"), "release 'pl-r36091', field 'role': must be one of"),
        (
            lambda d: d["releases"][3].update(colour="red"),
            "release 'pl-r36091', field 'colour': is not a known field",
        ),
        (
            lambda d: d["releases"][3].update(pipeline="2023.1.0.124+dirty"),
            "field 'pipeline': must be written",
        ),
        (lambda d: d["releases"][3].update(restore_with="pl-nope"), "'pl-nope' is not a release"),
        (lambda d: d["releases"][3].update(restore_with="pl-r42030"), "has no public tarball or wheels"),
        (lambda d: d["releases"][3].update(id=d["releases"][4]["id"]), "appears twice"),
        (lambda d: d["releases"][3].update(ops={"start": "April 2016"}), "start must be a date"),
        (lambda d: d["releases"][3]["tarball"].update(sha256="xyz"), "sha256 must be 64"),
        (
            lambda d: d["releases"][3].update(pipeline="2024.1.1.22", casa="6.6.1-17"),
            "listed as a non-ALMA build",
        ),
        (lambda d: d["releases"][3].pop("id"), "release #4, field 'id': is required"),
        (lambda d: d.pop("schema"), "schema: 1"),
        (lambda d: d["releases"][-1]["wheels"].update(casatools="6.6.4.34"), "is not CASA build"),
    ],
)
def test_broken_entries_are_named(mutate, message: str) -> None:
    data = raw()
    mutate(data)
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, "test.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("test.yaml: ")
    assert "\n" not in str(info.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot be read"):
        load_catalog(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("releases: [\n")
    with pytest.raises(CatalogError, match="not valid YAML at line"):
        load_catalog(bad)


def test_adding_a_release_is_one_yaml_block(tmp_path: Path) -> None:
    block = """
  - id: pl-2026.2.0.9
    role: pipeline
    casa: "6.7.4-4"
    pipeline: "2026.2.0.9"
    cycles: [13]
    ops: {start: "2026-10-01", end: null}
    python: "3.12"
    tarball: {name: casa-6.7.4-4-pipeline-2026.2.0.9-py3.12.el8.tar.xz, url_dir: "https://example.org/casa/"}
    confidence: confirmed
    sources: ["https://example.org/release-notes"]
"""
    text = BUNDLED.read_text().replace("\nreleases:\n", "\nreleases:" + block, 1)
    assert block in text
    path = tmp_path / "releases.yaml"
    path.write_text(text)
    catalog = load_catalog(path)
    dataset = write_dataset(tmp_path / "ds", spec=DatasetSpec(casa="6.7.4.4", pipeline="2026.2.0.9"))
    resolution = resolve_path(dataset, catalog)
    assert (resolution.release.id, resolution.exact) == ("pl-2026.2.0.9", True)
    assert catalog.latest_pipeline().id == "pl-2026.2.0.9"
