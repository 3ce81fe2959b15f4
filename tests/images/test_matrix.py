"""The image build matrix, tags, checksums, measures policy, prepuller snippet and apt-mirror
parsing (pure; no containers)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml

from casaspawner.catalog import Catalog
from casaspawner.catalog.model import Release, Wheels
from casaspawner.cli import main
from casaspawner.errors import CatalogError
from casaspawner.images.engine import AptSource, mirror_lines, parse_apt_sources
from casaspawner.images.matrix import (
    INPUT_HASH_LABEL,
    MEASURES_POLICIES,
    ImageBuildError,
    MatrixOptions,
    build_matrix,
    input_hash,
    parent_reference,
    parse_checksums,
    prepuller_name,
    prepuller_values,
    release_recipe,
    session_recipes,
    split_reference,
)
from casaspawner.plan import PlanConfig, image_for
from casaspawner.runtime import EXTRA_PACKAGES

SHA = "a" * 64


def test_every_available_release_gets_the_spawners_image_reference(catalog: Catalog) -> None:
    options = MatrixOptions(registry="registry.example.org/casa-team")
    recipes = build_matrix(catalog, options)
    base, session = recipes[:2]
    assert (base.kind, session.kind) == ("session-base", "session")
    assert session.image == "registry.example.org/casa-team/session:" + options.session_tag
    assert base.image == "registry.example.org/casa-team/session-base:" + options.session_tag
    assert parent_reference(base) == options.base_image
    assert parent_reference(session) == base.image
    by_name = {r.name: r for r in recipes[2:]}
    assert set(by_name) == {r.id for r in catalog.available()}
    config = PlanConfig(image_registry="registry.example.org/casa-team")
    for release in catalog.available():
        recipe = by_name[release.id]
        assert recipe.image == image_for(release, config)
        # CASA images build on the session base (not the session image): casaspawner is their last
        # layer.
        assert parent_reference(recipe) == base.image
        assert recipe.build_args["CASA_KERNEL_NAME"] == release.kernel_name
        assert recipe.labels["io.casaspawner.release"] == release.id
        assert recipe.kind == release.packaging


def test_custom_image_template_is_honoured(catalog: Catalog) -> None:
    options = MatrixOptions(registry="r.example", image_template="{registry}/casa-{casa}:{id}")
    recipe = release_recipe(catalog.get("casa-6.6.5-31"), options)
    assert recipe.image == "r.example/casa-6.6.5-31:casa-6.6.5-31"


def test_modular_recipe_pins_the_builds_wheels(catalog: Catalog) -> None:
    release = catalog.get("casa-6.6.5-31")
    recipe = release_recipe(release, MatrixOptions())
    assert recipe.buildable
    assert recipe.containerfile == "modular.Containerfile"
    requirements = release.wheels.requirements()  # type: ignore[union-attr]
    assert recipe.build_args["CASA_REQUIREMENTS"].split() == requirements
    assert "casatools==6.6.5.31" in recipe.build_args["CASA_REQUIREMENTS"]
    # Besides the wheels, what local environments add, from the same list (ipykernel,
    # protobuf<3.21, ...), but not the logger's 470 MB AppImage.
    extra = recipe.build_args["CASA_EXTRA_PACKAGES"].split()
    assert extra == [p for p in EXTRA_PACKAGES if p != "casalogger"] and "protobuf<3.21" in extra
    assert recipe.build_args["PYTHON"] == "python3.11"
    assert recipe.build_args["CASA_KERNEL_ID"] == "casa-6.6.5-31"


def test_modular_recipe_refuses_a_python_without_wheels(catalog: Catalog) -> None:
    options = MatrixOptions(python="3.12")
    old, new = (
        release_recipe(catalog.get("casa-6.6.5-31"), options),
        release_recipe(catalog.get("casa-6.7.0-31"), options),
    )
    assert not old.buildable and "Python 3.12" in (old.problem or "")
    assert new.buildable and new.build_args["PYTHON"] == "python3.12"


def test_monolithic_recipe_uses_a_pinned_sha256_else_the_published_md5(catalog: Catalog) -> None:
    release = catalog.get("pl-2024.1.0.8")
    assert release.tarball is not None and release.tarball.sha256 is None
    unpinned = release_recipe(release, MatrixOptions())
    assert unpinned.buildable
    # Looked up in <url>.md5 when the build starts.
    assert unpinned.build_args["CASA_TARBALL_CHECKSUM"] == ""
    assert (
        unpinned.labels["io.casaspawner.tarball-checksum"] == f"md5 of {release.tarball.url}.md5"
    )
    pinned = release_recipe(release, MatrixOptions(checksums={release.tarball.name: SHA}))
    assert pinned.buildable
    assert pinned.build_args["CASA_TARBALL_CHECKSUM"] == f"sha256:{SHA}"
    assert pinned.labels["io.casaspawner.tarball-checksum"] == f"sha256:{SHA}"
    assert pinned.build_args["CASA_TARBALL_URL"] == release.tarball.url
    assert pinned.build_args["CASA_PYTHON"] == f"/opt/casa/{release.tag}/lib/py/bin/python3"
    bad = release_recipe(release, MatrixOptions(checksums={release.tarball.name: "abc"}))
    assert not bad.buildable and "64 hexadecimal digits" in (bad.problem or "")


def test_a_catalog_sha256_always_wins(catalog: Catalog) -> None:
    release = catalog.get("pl-2024.1.0.8")
    assert release.tarball is not None
    pinned = dataclasses.replace(release, tarball=dataclasses.replace(release.tarball, sha256=SHA))
    # Pinned, the tarball verifies against it from any mirror, plain http too: no .md5 is
    # consulted.
    recipe = release_recipe(
        pinned, MatrixOptions(tarball_mirror="http://mirror.example.org/casa/")
    )
    assert recipe.buildable and recipe.build_args["CASA_TARBALL_CHECKSUM"] == f"sha256:{SHA}"
    same = release_recipe(pinned, MatrixOptions(checksums={release.tarball.name: SHA.upper()}))
    assert same.buildable and same.build_args["CASA_TARBALL_CHECKSUM"] == f"sha256:{SHA}"
    # An operator's other checksum does not replace it: the recipe says they disagree.
    other = release_recipe(pinned, MatrixOptions(checksums={release.tarball.name: "b" * 64}))
    assert not other.buildable
    assert other.problem == (
        f"the catalog pins SHA-256 {SHA} for {release.tarball.name}, and --checksums/--sha256 "
        "gives another"
    )


def test_the_md5_fallback_needs_https_or_a_mirror_on_this_machine(catalog: Catalog) -> None:
    release = catalog.get("pl-2024.1.0.8")
    assert release.tarball is not None and release.tarball.sha256 is None
    plain = release_recipe(release, MatrixOptions(tarball_mirror="http://mirror.example.org/casa"))
    url = f"http://mirror.example.org/casa/{release.tarball.name}"
    assert not plain.buildable
    assert plain.problem == (
        "its tarball cannot be verified (the catalog has no SHA-256, and an MD5 counts only over "
        f"https or from this machine, not {url}.md5); pin a SHA-256 with --checksums or --sha256"
    )
    for mirror in ("https://mirror.example.org/casa/", "http://127.0.0.1:8000/casa/", None):
        assert release_recipe(release, MatrixOptions(tarball_mirror=mirror)).buildable, mirror
    given = MatrixOptions(
        tarball_mirror="http://mirror.example.org/casa", checksums={release.tarball.name: SHA}
    )
    assert release_recipe(release, given).buildable


def test_every_published_tarball_release_is_buildable(catalog: Catalog) -> None:
    recipes = build_matrix(catalog, MatrixOptions())[2:]
    monolithic = [r for r in recipes if r.kind == "monolithic"]
    assert len(monolithic) == 25
    assert [r.name for r in recipes if not r.buildable] == []


def test_measures_policy_follows_the_catalogs_data_field(catalog: Catalog) -> None:
    # CASA 6.6.1: data bundled.
    bundled = release_recipe(catalog.get("pl-2024.1.0.8"), MatrixOptions())
    # CASA 6.6.6.
    casaconfig = release_recipe(catalog.get("pl-2025.1.0.35"), MatrixOptions())
    modular = release_recipe(catalog.get("casa-6.6.5-31"), MatrixOptions())
    assert bundled.build_args["CASA_DATA"] == "bundled"
    assert casaconfig.build_args["CASA_DATA"] == "casaconfig"
    assert bundled.labels["io.casaspawner.measures"] == MEASURES_POLICIES["bundled"]
    assert (
        "geodetic and ephemerides are links into /opt/casa/measures"
        in MEASURES_POLICIES["bundled"]
    )
    for recipe in (casaconfig, modular):
        assert recipe.labels["io.casaspawner.measures"] == MEASURES_POLICIES["casaconfig"]
    assert "CASASITECONFIG" in MEASURES_POLICIES["casaconfig"]
    old_wheels = Release(
        id="casa-6.2.1-7",
        role="modular",
        casa="6.2.1-7",
        confidence="confirmed",
        data="bundled",
        wheels=Wheels(python=("3.11",), casatools="6.2.1.7", casatasks="6.2.1.7"),
    )
    refused = release_recipe(old_wheels, MatrixOptions())
    assert not refused.buildable and "predates casaconfig" in (refused.problem or "")


def test_tarball_mirror_keeps_the_file_name(catalog: Catalog) -> None:
    release = catalog.get("pl-2024.1.0.8")
    recipe = release_recipe(release, MatrixOptions(tarball_mirror="http://127.0.0.1:8000/casa/"))
    name = release.tarball.name  # type: ignore[union-attr]
    assert recipe.build_args["CASA_TARBALL_URL"] == f"http://127.0.0.1:8000/casa/{name}"


def test_casa_4_and_5_have_no_python3_kernel(catalog: Catalog) -> None:
    recipe = release_recipe(catalog.get("pl-r42866"), MatrixOptions())
    assert recipe.build_args["CASA_PYTHON"] == ""


def test_unknown_or_unpublished_releases_are_refused(catalog: Catalog) -> None:
    with pytest.raises(CatalogError):
        build_matrix(catalog, MatrixOptions(), ["no-such-release"])
    unpublished = next(r for r in catalog.releases if not r.available)
    with pytest.raises(ImageBuildError, match="no public build"):
        build_matrix(catalog, MatrixOptions(), [unpublished.id])


def test_checksum_file_in_sha256sum_format() -> None:
    text = f"# pins\n{SHA}  casa-a.tar.xz\n{'b' * 64} *dir/casa-b.tar.gz\n"
    assert parse_checksums(text) == {"casa-a.tar.xz": SHA, "casa-b.tar.gz": "b" * 64}
    with pytest.raises(ImageBuildError, match="line 1"):
        parse_checksums("not-a-sum casa.tar.xz")


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("ghcr.io/casaspawner/casa:6.6.5-31", ("ghcr.io/casaspawner/casa", "6.6.5-31")),
        (
            "localhost:5000/casa:6.5.4-9-pipeline-2023.1.0.124",
            ("localhost:5000/casa", "6.5.4-9-pipeline-2023.1.0.124"),
        ),
        ("localhost:5000/casa", ("localhost:5000/casa", "latest")),
    ],
)
def test_split_reference(reference: str, expected: tuple[str, str]) -> None:
    assert split_reference(reference) == expected


def test_split_reference_refuses_digests() -> None:
    with pytest.raises(ImageBuildError, match="digest"):
        split_reference("ghcr.io/x/casa@sha256:" + SHA)


def test_prepuller_names_are_container_names_and_unique(catalog: Catalog) -> None:
    names = [prepuller_name(r) for r in catalog.available()]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", n) for n in names)


def test_prepuller_values_recombine_to_the_spawners_images(catalog: Catalog) -> None:
    config = PlanConfig(image_registry="localhost:5000/team")
    releases = [catalog.get("casa-6.6.5-31"), catalog.get("pl-2023.1.0.124")]
    extra = prepuller_values(releases, config)["prePuller"]["extraImages"]  # type: ignore[index]
    assert sorted(f"{v['name']}:{v['tag']}" for v in extra.values()) == sorted(
        image_for(r, config) for r in releases
    )


def test_input_hash_tracks_inputs(catalog: Catalog) -> None:
    recipe = session_recipes(MatrixOptions())[0]
    files = {"Containerfile": b"FROM x\n", "entrypoint.sh": b"#!/bin/sh\n"}
    base = input_hash(recipe, files, "sha256:parent")
    assert base == input_hash(recipe, dict(files), "sha256:parent")
    assert base != input_hash(
        recipe, {**files, "entrypoint.sh": b"#!/bin/sh -e\n"}, "sha256:parent"
    )
    assert base != input_hash(recipe, files, "sha256:other-parent")
    other_base = session_recipes(MatrixOptions(base_image="localhost/other:1"))[0]
    assert base != input_hash(other_base, files, "sha256:parent")
    assert INPUT_HASH_LABEL.startswith("io.casaspawner.")


DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_apt_sources_and_mirror_lines() -> None:
    sources = parse_apt_sources(
        {
            "debian.sources": DEB822,
            "extra.list": "deb [arch=amd64] https://other.example/apt stable main\n",
        }
    )
    assert sources == [
        AptSource("http://mirror.example/debian", ("bookworm", "bookworm-updates"), ("main",)),
        AptSource("http://mirror.example/debian-security", ("bookworm-security",), ("main",)),
        AptSource("https://other.example/apt", ("stable",), ("main",)),
    ]
    assert mirror_lines(sources, "bookworm") == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]
    # A host on another suite still names its mirror for the suite asked for.
    assert mirror_lines(sources, "trixie") == ["deb http://mirror.example/debian trixie main"]
    with pytest.raises(ImageBuildError, match="no Debian mirror"):
        mirror_lines([], "bookworm")


def test_file_mirrors_are_left_out_or_refused_in_one_sentence() -> None:
    local = AptSource("file:/srv/mirror/debian", ("bookworm",), ("main",))
    remote = AptSource("https://mirror.example/debian", ("bookworm",), ("main",))
    assert parse_apt_sources({"local.list": "deb file:/srv/mirror/debian bookworm main\n"}) == [
        local
    ]
    assert mirror_lines([local, remote], "bookworm") == [
        "deb https://mirror.example/debian bookworm main"
    ]
    with pytest.raises(ImageBuildError) as refused:
        mirror_lines([local], "bookworm")
    message = str(refused.value)
    assert (
        "file:/ directory, which container builds cannot reach" in message
        and "--base IMAGE" in message
    )
    assert len(message.splitlines()) == 1


def test_cli_list_json_and_prepuller(catalog: Catalog, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["images", "list", "--json", "--registry", "r.example", "--releases", "casa-6.7.0-31"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == ["session-base", "session", "casa-6.7.0-31"]
    assert rows[2]["image"] == image_for(
        catalog.get("casa-6.7.0-31"), PlanConfig(image_registry="r.example")
    )
    assert rows[2]["recipe"] == "images/casa/modular.Containerfile"
    assert main(["images", "prepuller", "--releases", "casa-6.6.5-31"]) == 0
    values = yaml.safe_load(capsys.readouterr().out)
    assert values == {
        "prePuller": {
            "extraImages": {
                "casa-6-6-5-31": {"name": "ghcr.io/casaspawner/casa", "tag": "6.6.5-31"}
            }
        }
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["images", "prepuller", "--releases", "nope"], "not a release in the catalog"),
        (["images", "build", "--sha256", SHA], "--sha256 needs exactly one --release"),
        (
            ["images", "list", "--checksums", "/nonexistent/SHA256SUMS"],
            "cannot read the checksum file",
        ),
    ],
)
def test_cli_bad_input_is_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
