from __future__ import annotations

from pathlib import Path

import pytest

from casaspawner.catalog import Catalog
from casaspawner.datasets.resolve import resolve_path
from casaspawner.datasets.synth import write_dataset
from casaspawner.errors import InvalidInput
from casaspawner.plan import (
    Identity,
    PlanConfig,
    SessionOptions,
    StorageLayout,
    Substitution,
    image_for,
    make_plan,
    pinned_image,
)


@pytest.fixture
def resolution(tmp_path: Path, catalog: Catalog):
    return resolve_path(
        write_dataset(tmp_path, "cycle10"), catalog, label="uid://A001/X3621/X3d68"
    )


def alice(**kw) -> Identity:
    return Identity(
        "alice",
        54321,
        54321,
        groups=kw.get("groups", ("casa-team", "ALMA.Cycle10")),
        supplemental_gids=(2000,),
    )


def test_lab_plan(resolution, catalog: Catalog) -> None:
    plan = make_plan(alice(), SessionOptions("uid://A001/X3621/X3d68"), catalog, resolution)
    assert plan.release.id == "pl-2023.1.0.124" and plan.exact and not plan.approximate
    assert plan.image == "ghcr.io/casaspawner/casa:6.5.4-9-pipeline-2023.1.0.124"
    assert (plan.interface, plan.default_url, plan.home) == ("lab", "/lab", "/arc/home/alice")
    assert [(m.name, m.kind, m.path, m.sub_path, m.read_only) for m in plan.mounts] == [
        ("home", "storage", "/arc/home/alice", "home/alice", False),
        ("project-casa-team", "storage", "/arc/projects/casa-team", "projects/casa-team", False),
        (
            "project-alma.cycle10",
            "storage",
            "/arc/projects/ALMA.Cycle10",
            "projects/ALMA.Cycle10",
            False,
        ),
        ("scratch", "scratch", "/scratch", None, False),
        ("measures", "measures", "/opt/casa/measures", None, True),
    ]
    assert plan.environment["HOME"] == "/arc/home/alice"
    assert plan.environment["CASASPAWNER_CASA"] == "6.5.4-9"
    assert "JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP" not in plan.environment
    assert plan.labels["casaspawner.io/casa"] == "6.5.4-9"
    assert plan.labels["casaspawner.io/dataset"] == "uid___A001_X3621_X3d68"
    assert plan.annotations["casaspawner.io/dataset"] == "uid://A001/X3621/X3d68"
    assert (
        plan.summary
        == "CASA 6.5.4-9 (pipeline 2023.1.0.124) · JupyterLab · uid://A001/X3621/X3d68 · exact"
    )
    assert plan.kernel_name == "CASA 6.5.4-9"


def test_desktop_plan_and_configured_layout(resolution, catalog: Catalog) -> None:
    config = PlanConfig(
        image_registry="registry.example.org/alma/",
        image_template="{registry}/casa-{casa}:{tag}",
        label_prefix="alma.example.org",
        storage=StorageLayout(home_mount="/home/{username}", measures_mount="/data/measures"),
        desktop_xstartup="/usr/local/bin/casa-desktop",
    )
    plan = make_plan(
        alice(groups=()),
        SessionOptions("x", interface="desktop", size="small"),
        catalog,
        resolution,
        config,
    )
    assert plan.image == "registry.example.org/alma/casa-6.5.4-9:6.5.4-9-pipeline-2023.1.0.124"
    assert plan.default_url == "/desktop/"
    assert (
        plan.environment["JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP"] == "/usr/local/bin/casa-desktop"
    )
    assert plan.environment["CASA_MEASURES_PATH"] == "/data/measures"
    assert plan.home == "/home/alice" and [m.name for m in plan.mounts] == [
        "home",
        "scratch",
        "measures",
    ]
    assert plan.resources.mem_limit == "4G"
    assert all(key.startswith("alma.example.org/") for key in plan.labels)
    assert image_for(plan.release, config) == plan.image


def test_override_and_substitution_are_never_exact(resolution, catalog: Catalog) -> None:
    plan = make_plan(alice(), SessionOptions("x", release="pl-2025.1.0.36"), catalog, resolution)
    assert (plan.release.id, plan.exact, plan.approximate) == ("pl-2025.1.0.36", False, False)
    assert "You chose CASA 6.6.6-18" in plan.reason and "6.5.4-9" in plan.reason
    assert plan.summary.endswith("not exact")
    sub = Substitution(
        catalog.get("casa-6.6.5-31"), "CASA 6.5.4-9 cannot be installed on this machine"
    )
    plan = make_plan(alice(), SessionOptions("x"), catalog, resolution, substitution=sub)
    assert (plan.release.id, plan.exact, plan.approximate) == ("casa-6.6.5-31", False, True)
    assert plan.kernel_name == "CASA 6.6.5-31 (approximate)"
    assert plan.environment["CASASPAWNER_KERNEL_NAME"] == plan.kernel_name
    assert plan.summary.endswith("approximate")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda c, r: make_plan(Identity("root", 0, 0), SessionOptions("x"), c, r),
            "never run as root",
        ),
        (
            lambda c, r: make_plan(Identity("a b", 1000, 1000), SessionOptions("x"), c, r),
            "not a usable user name",
        ),
        (
            lambda c, r: make_plan(
                Identity("a", 1000, 1000, ("../x",)), SessionOptions("x"), c, r
            ),
            "not a usable group",
        ),
        (
            lambda c, r: make_plan(alice(), SessionOptions("x", interface="vnc"), c, r),
            "choose lab or desktop",
        ),  # type: ignore[arg-type]
        (
            lambda c, r: make_plan(alice(), SessionOptions("x", size="huge"), c, r),
            "not a session size",
        ),
        (
            lambda c, r: make_plan(alice(), SessionOptions("x", release="nope"), c, r),
            "not a release in the catalog",
        ),
        (
            lambda c, r: make_plan(alice(), SessionOptions("x", release="pl-r42030"), c, r),
            "no public build",
        ),
        (lambda c, r: PlanConfig(label_prefix="Not A Prefix"), "label prefix"),
    ],
)
def test_bad_input_is_one_sentence(resolution, catalog: Catalog, build, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        build(catalog, resolution)
    assert "\n" not in str(info.value)


def test_plan_is_pure(resolution, catalog: Catalog) -> None:
    args = (
        alice(),
        SessionOptions("uid://A001/X3621/X3d68", interface="desktop"),
        catalog,
        resolution,
    )
    assert make_plan(*args) == make_plan(*args)


@pytest.mark.parametrize(
    ("reference", "pinned"),
    [
        ("registry.example:5000/casa/casa:6.6.5-31", "registry.example:5000/casa/casa@sha256:"),
        ("localhost/casaspawner/casa:pl-2023.1.0.124", "localhost/casaspawner/casa@sha256:"),
        ("casa:6.6.5-31", "casa@sha256:"),
        (f"casa@sha256:{'e' * 64}", "casa@sha256:"),
    ],
)
def test_a_pinned_image_is_named_by_its_digest_alone(reference: str, pinned: str) -> None:
    digest = "f" * 64
    assert pinned_image(reference, digest) == pinned + digest


def test_a_pin_must_be_a_sha256() -> None:
    with pytest.raises(InvalidInput, match="by a sha256 digest"):
        SessionOptions("ds", pin="sha256:" + "f" * 64)
