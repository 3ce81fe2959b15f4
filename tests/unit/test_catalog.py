from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from casaspawner.catalog import Catalog, load_catalog, parse_casa, parse_catalog
from casaspawner.catalog.model import OPS_END_UNKNOWN, _bundled_catalog
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


# alma-casa.md §3.1: CASA versions used for manual calibration, per cycle (series "4.5" = any
# 4.5.x).
MANUAL_CASA = {
    0: ["3.3", "3.4", "4.0"],
    1: ["4.1", "4.2"],
    2: ["4.2.2", "4.3"],
    3: ["4.3.1", "4.5"],
    4: ["4.7.2"],
}


@pytest.mark.parametrize("cycle", sorted(MANUAL_CASA))
def test_manual_casa_of_cycles_0_to_4(catalog: Catalog, cycle: int) -> None:
    for version in MANUAL_CASA[cycle]:
        builds = [
            r
            for r in catalog.with_casa(parse_casa(version, allow_partial=True))
            if cycle in r.manual_cycles
        ]
        assert builds, f"no release records CASA {version} for Cycle {cycle} manual calibration"
        for release in builds:
            assert release.sources and (release.role == "manual" or release.manual is not None)


def test_manual_use_of_pipeline_builds_is_recorded_on_them(catalog: Catalog) -> None:
    # Cycle 3-4 manual data used the cycle's CASA builds, which are the pipeline tarballs (one
    # image each)
    assert {r.id for r in catalog if 4 in r.manual_cycles} == {"pl-r38377", "pl-r39732"}
    assert {r.casa for r in catalog if 3 in r.manual_cycles} == {
        "4.3.1",
        "4.5.0",
        "4.5.1",
        "4.5.2",
        "4.5.3",
    }
    release = catalog.get("pl-r39732")
    assert release.manual is not None and release.manual.confidence == "secondary"
    assert release.uses == "pipeline (4), manual (4)"


def test_internal_builds_map_to_their_public_restore_build(catalog: Catalog) -> None:
    internal = catalog.get("pl-r42030")
    assert (internal.casa, internal.available) == ("5.4.0-68", False)
    assert catalog.public_release_for(internal).casa == "5.4.0-70"
    assert catalog.public_release_for(catalog.get("pl-2020.1.0.36")).id == "pl-2020.1.0.40"
    # alma-casa.md §8.6: r42833 is an internal build restored with 5.6.1-8 (r42866), not an alias
    # of it; r30594, the first Cycle 2 build, has no tarball of its own either
    for internal_id, public_id in (("pl-r42833", "pl-r42866"), ("pl-r30594", "pl-cycle2-r31667")):
        release = catalog.get(internal_id)
        assert not release.available and release.restore_with == public_id
        assert catalog.with_pipeline(release.pipeline or "") == [release]


def test_superseded_builds_are_not_current(catalog: Catalog) -> None:
    assert [r.id for r in catalog if r.is_current] == ["pl-2025.1.0.37"]
    for release_id in ("pl-r42030", "pl-2020.1.0.36", "pl-r42833", "pl-r30594"):
        release = catalog.get(release_id)
        assert release.ops_end == OPS_END_UNKNOWN and not release.is_current
        assert release.ops_period.endswith("→ superseded")
    assert catalog.get("pl-2025.1.0.37").ops_period == "2026-05-01 → now"
    assert catalog.get("pl-2026.2.0").ops_period == "planned from 2026-10"
    assert catalog.get("casa-3.4.0").ops_period == ""


def test_unquoted_yaml_dates_are_dates(tmp_path: Path) -> None:
    text = BUNDLED.read_text()
    quoted = 'ops: {start: "2023-10-01", end: "2024-09-29"}'
    assert quoted in text
    path = tmp_path / "releases.yaml"
    path.write_text(text.replace(quoted, "ops: {start: 2023-10-01, end: 2024-09-29}"))
    release = load_catalog(path).get("pl-2023.1.0.124")
    assert (release.ops_start, release.ops_end) == ("2023-10-01", "2024-09-29")
    path.write_text(text.replace(quoted, "ops: {start: 2023-10-01 12:00:00, end: 2024-09-29}"))
    with pytest.raises(CatalogError, match="start must be a date written YYYY-MM-DD"):
        load_catalog(path)


def test_summary_rows_carry_every_catalog_field(catalog: Catalog) -> None:
    for entry in raw()["releases"]:
        row = catalog.get(entry["id"]).summary_row()
        for key, value in entry.items():
            if key == "ops":
                assert (row["ops_start"], row["ops_end"]) == (value.get("start"), value.get("end"))
            elif key == "tarball":
                assert row["tarball"] == (value["url_dir"] + value["name"] if value else None)
            elif key == "wheels":
                assert row["wheels_python"] == value["python"]
                assert f"casatools=={value['casatools']}" in row["wheels"]
            elif key == "manual":
                assert row["manual"] == {"note": None, **value}
            else:
                assert row[key] == value, (entry["id"], key)


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


def rel(data: dict, release_id: str) -> dict:
    return next(r for r in data["releases"] if r["id"] == release_id)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: rel(d, "pl-r36091").update(casa="6.5"), "release 'pl-r36091', field 'casa'"),
        (lambda d: rel(d, "pl-r36091").update(casa="6.5.4.9"), "must be written '6.5.4-9'"),
        (
            lambda d: rel(d, "pl-r36091").update(role="vla"),
            "release 'pl-r36091', field 'role': must be one of",
        ),
        (
            lambda d: rel(d, "pl-r36091").update(colour="red"),
            "release 'pl-r36091', field 'colour': is not a known field",
        ),
        (
            lambda d: rel(d, "pl-r36091").update(pipeline="2023.1.0.124+dirty"),
            "field 'pipeline': must be written",
        ),
        (
            lambda d: rel(d, "pl-r36091").update(restore_with="pl-nope"),
            "'pl-nope' is not a release",
        ),
        (
            lambda d: rel(d, "pl-r36091").update(restore_with="pl-r42030"),
            "has no public tarball or wheels",
        ),
        (lambda d: rel(d, "pl-r36091").update(id="pl-r36660"), "appears twice"),
        (
            lambda d: rel(d, "pl-r36091").update(ops={"start": "April 2016"}),
            "start must be a date",
        ),
        (
            lambda d: rel(d, "pl-r36091").update(ops={"start": "2016-04-01", "end": "later"}),
            "or unknown for",
        ),
        (lambda d: rel(d, "pl-r36091").update(ops={"start": "unknown"}), "start must be a date"),
        (
            lambda d: rel(d, "pl-r36091").update(ops={"end": "2016-04-08"}),
            "has an end but no start",
        ),
        (lambda d: rel(d, "pl-r36091")["tarball"].update(sha256="xyz"), "sha256 must be 64"),
        (
            lambda d: rel(d, "pl-r36091").update(pipeline="2024.1.1.22", casa="6.6.1-17"),
            "listed as a non-ALMA build",
        ),
        (lambda d: d["releases"][3].pop("id"), "release #4, field 'id': is required"),
        (lambda d: d.pop("schema"), "schema: 1"),
        (lambda d: d.pop("releases"), "no `releases:` list"),
        (
            lambda d: rel(d, "casa-6.7.0-31")["wheels"].update(casatools="6.6.4.34"),
            "is not CASA build",
        ),
        (lambda d: rel(d, "pl-r36091").update(casa="4.5.3", pipeline="r36660"), "share image tag"),
        (
            lambda d: rel(d, "pl-r39732")["manual"].update(confidence="likely"),
            "field 'manual': confidence",
        ),
        (
            lambda d: rel(d, "pl-r39732")["manual"].update(cycles=[]),
            "field 'manual': cycles must list",
        ),
        (lambda d: rel(d, "pl-r39732")["manual"].pop("sources"), "sources must say where"),
        (
            lambda d: rel(d, "casa-4.5.0").update(manual={"cycles": [3]}),
            "belongs on pipeline releases",
        ),
        (lambda d: d["restore_builds"][0].update(casa="4.7"), "restore_builds #1, field 'casa'"),
        (lambda d: d.update(restore_builds={"casa": "4.7.1"}), "must be a list"),
    ],
)
def test_broken_entries_are_named(mutate, message: str) -> None:
    data = raw()
    mutate(data)
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, "test.yaml")
    text = str(info.value)
    assert message in text
    assert text.startswith("test.yaml: ") and text.endswith(".") and not text.endswith("..")
    assert "\n" not in text


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot be read"):
        load_catalog(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("releases: [\n")
    with pytest.raises(CatalogError, match="not valid YAML at line"):
        load_catalog(bad)
    bad.write_bytes(b"\xff\xfe schema: 1")
    with pytest.raises(CatalogError, match="is not UTF-8 text"):
        load_catalog(bad)
    bad.write_text("releases: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(CatalogError, match="nested too deeply"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="cannot be read"):
        load_catalog(tmp_path)


def test_adding_a_release_is_one_yaml_block(tmp_path: Path) -> None:
    block = """
  - id: pl-2026.2.0.9
    role: pipeline
    casa: "6.7.4-4"
    pipeline: "2026.2.0.9"
    cycles: [13]
    ops: {start: "2026-10-01", end: null}
    python: "3.12"
    tarball:
      name: casa-6.7.4-4-pipeline-2026.2.0.9-py3.12.el8.tar.xz
      url_dir: "https://example.org/casa/"
    confidence: confirmed
    sources: ["https://example.org/release-notes"]
"""
    text = BUNDLED.read_text().replace("\nreleases:\n", "\nreleases:" + block, 1)
    assert block in text
    path = tmp_path / "releases.yaml"
    path.write_text(text)
    catalog = load_catalog(path)
    dataset = write_dataset(
        tmp_path / "ds", spec=DatasetSpec(casa="6.7.4.4", pipeline="2026.2.0.9")
    )
    resolution = resolve_path(dataset, catalog)
    assert (resolution.release.id, resolution.exact) == ("pl-2026.2.0.9", True)
    assert catalog.latest_pipeline().id == "pl-2026.2.0.9"
