"""The session pipeline on its own: one pass from a request to a plan, no JupyterHub."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support.session import Backend

from casaspawner.catalog.model import Catalog
from casaspawner.datasets.synth import DatasetSpec, write_dataset
from casaspawner.errors import ConfigurationError, InvalidInput, ReleaseBlocked, VersionUnknown
from casaspawner.plan import PlanConfig, Resources, image_for
from casaspawner.session.prepare import prepare
from casaspawner.session.relaunch import PastSession, environment_refusal
from casaspawner.session.settings import SessionSettings


def settings(catalog: Catalog, **changes: object) -> SessionSettings:
    values: dict[str, object] = {
        "catalog": catalog,
        "plan": PlanConfig(),
        "default_size": "medium",
    }
    values.update(changes)
    return SessionSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    """A Cycle 10 dataset: CASA 6.5.4-9 with pipeline 2023.1.0.124."""
    return str(write_dataset(tmp_path, era="cycle10"))


def run(options: dict[str, object], catalog: Catalog, backend: Backend, **changes: object):
    return asyncio.run(prepare(options, settings(catalog, **changes), backend))


def test_one_pass_gives_the_exact_build_and_asks_each_step_once(
    catalog: Catalog, dataset: str
) -> None:
    backend = Backend(catalog)
    plan = run({"dataset": dataset, "interface": "desktop"}, catalog, backend)
    assert (plan.release.casa, plan.exact, plan.approximate) == ("6.5.4-9", True, False)
    assert plan.interface == "desktop" and plan.identity.uid == 1000
    release = plan.release.id
    assert backend.calls == [
        "identity",
        "read",
        f"resolved {release}",
        f"substitute {release}",
        "measures None",
        "blocked",
    ]
    # Without a measures volume kept by version, the session reads all of it.
    assert plan.measures_version is None


def test_a_substitute_release_is_checked_against_drains(catalog: Catalog, dataset: str) -> None:
    backend = Backend(catalog, substitute_with="casa-6.6.5-31", blocked={"casa-6.6.5-31": ""})
    with pytest.raises(ReleaseBlocked, match="^CASA 6.6.5-31 cannot be started right now"):
        run({"dataset": dataset}, catalog, backend)


def test_a_substitute_plan_is_approximate_and_says_why(catalog: Catalog, dataset: str) -> None:
    backend = Backend(catalog, substitute_with="casa-6.6.5-31")
    plan = run({"dataset": dataset}, catalog, backend)
    assert plan.release.id == "casa-6.6.5-31"
    assert plan.approximate and not plan.exact
    assert plan.reason.startswith("This machine cannot run it (the dataset calls for CASA 6.5.4-9")


def test_a_drained_release_is_refused_with_the_operators_message(
    catalog: Catalog, dataset: str
) -> None:
    exact = run({"dataset": dataset}, catalog, Backend(catalog)).release.id
    backend = Backend(catalog, blocked={exact: "Being replaced until 14:00."})
    with pytest.raises(ReleaseBlocked, match=r"^Being replaced until 14:00\.$"):
        run({"dataset": dataset}, catalog, backend)


def test_bad_options_are_refused_before_anything_is_asked(catalog: Catalog) -> None:
    backend = Backend(catalog)
    with pytest.raises(InvalidInput, match="not an interface"):
        run({"dataset": "x", "interface": "vnc"}, catalog, backend)
    assert backend.calls == []


def test_a_hub_without_overrides_refuses_a_chosen_release(catalog: Catalog, dataset: str) -> None:
    options = {"dataset": dataset, "release": "casa-6.6.5-31"}
    with pytest.raises(InvalidInput, match="does not allow choosing"):
        run(options, catalog, Backend(catalog), allow_override=False)


def test_a_chosen_release_runs_a_dataset_that_tells_no_version(
    catalog: Catalog, tmp_path: Path
) -> None:
    spec = DatasetSpec(casa=None, pipeline=None, evidence=("none",))
    path = str(write_dataset(tmp_path, spec=spec))
    with pytest.raises(VersionUnknown):
        run({"dataset": path}, catalog, Backend(catalog))
    plan = run({"dataset": path, "release": "casa-6.6.5-31"}, catalog, Backend(catalog))
    assert plan.release.id == "casa-6.6.5-31" and not plan.exact
    assert plan.resolution.evidence.kind == "none"


def test_a_hub_with_one_size_ignores_the_size_a_request_names(
    catalog: Catalog, dataset: str
) -> None:
    one = PlanConfig(sizes={"machine": Resources(0, 0, "", "")})
    options = {"dataset": dataset, "size": "large"}
    plan = run(options, catalog, Backend(catalog), plan=one, default_size="machine")
    assert plan.options.size == "machine"
    with pytest.raises(InvalidInput, match="'huge' is not a session size"):
        run({"dataset": dataset, "size": "huge"}, catalog, Backend(catalog))


def test_the_spawners_own_output_is_dropped_from_saved_options(
    catalog: Catalog, dataset: str
) -> None:
    saved = {
        "dataset": dataset,
        "profile": "CASA 6.5.4-9 · JupyterLab · … · exact",
        "casaspawner": {"release": "casa-4.2.2"},
    }
    assert run(saved, catalog, Backend(catalog)).options.release is None
    with pytest.raises(InvalidInput, match="'casa_version' is not a session option"):
        run({"dataset": dataset, "casa_version": "6.5.4-9"}, catalog, Backend(catalog))


DIGEST = "d" * 64


def past_session(dataset: str, release: str = "pl-2023.1.0.124") -> PastSession:
    return PastSession(
        "20261206T101500Z-member",
        "2026-12-06 10:15 UTC",
        dataset,
        "desktop",
        "small",
        release,
        "an earlier build",
        DIGEST,
    )


def test_a_relaunch_runs_the_past_sessions_options_by_its_digest(
    catalog: Catalog, dataset: str
) -> None:
    backend = Backend(catalog, past=[past_session(dataset)])
    # What else the form sent is not what the past session ran.
    options = {"relaunch": "20261206T101500Z-member", "dataset": "other", "interface": "lab"}
    plan = run(options, catalog, backend)
    assert (plan.options.dataset, plan.interface, plan.options.size) == (
        dataset,
        "desktop",
        "small",
    )
    assert (plan.release.id, plan.exact, plan.options.pin) == ("pl-2023.1.0.124", True, DIGEST)
    tagged = image_for(plan.release, PlanConfig())
    assert plan.image == f"{tagged.rsplit(':', 1)[0]}@sha256:{DIGEST}"
    assert backend.calls[0] == "past 20261206T101500Z-member"


def test_a_relaunch_of_an_unknown_or_malformed_session_is_one_sentence(
    catalog: Catalog, dataset: str
) -> None:
    backend = Backend(catalog, past=[past_session(dataset)])
    with pytest.raises(InvalidInput, match="^There is no past session 'gone' of yours"):
        run({"relaunch": "gone"}, catalog, backend)
    with pytest.raises(InvalidInput, match="must be one of your past sessions' names"):
        run({"relaunch": "../x"}, catalog, backend)
    # Nothing was asked of the backend beyond the lookup.
    assert backend.calls == ["past gone"]


def test_a_relaunch_that_would_run_another_release_is_refused(
    catalog: Catalog, dataset: str
) -> None:
    """Where users may not choose a release, the dataset decides; where it now decides another
    than the past session ran, there is nothing to relaunch exactly."""
    past = past_session(dataset, release="casa-6.6.5-31")
    backend = Backend(catalog, past=[past])
    with pytest.raises(InvalidInput, match="^That session ran an earlier build, and this hub"):
        run({"relaunch": past.name}, catalog, backend, allow_override=False)
    # Where users may choose, the past session's release runs again, marked as chosen.
    plan = run({"relaunch": past.name}, catalog, backend)
    assert (plan.release.id, plan.exact) == ("casa-6.6.5-31", False)
    # A machine that must substitute another release cannot relaunch it either.
    substituting = Backend(catalog, past=[past_session(dataset)], substitute_with="casa-6.6.5-31")
    with pytest.raises(InvalidInput, match="cannot be relaunched exactly"):
        run({"relaunch": past.name}, catalog, substituting)


def test_a_relaunch_runs_only_the_environment_it_ran(catalog: Catalog, dataset: str) -> None:
    """On one machine the environment is named by its packages' sha256: another is refused."""
    past = past_session(dataset)
    plan = run({"relaunch": past.name}, catalog, Backend(catalog, past=[past]))
    assert environment_refusal(plan, DIGEST) is None
    refusal = environment_refusal(plan, "e" * 64)
    assert refusal is not None and refusal.startswith(
        f"The {plan.release.label} environment on this machine has changed since that session"
    )
    # A session that is no relaunch runs whatever the environment now holds.
    assert (
        environment_refusal(run({"dataset": dataset}, catalog, Backend(catalog)), "e" * 64) is None
    )


def versions(root: Path, *names: str) -> Path:
    """A measures volume keeping ``names``, each a directory with a marker file."""
    for name in names:
        (root / name / "geodetic").mkdir(parents=True)
        (root / name / "geodetic" / "readme.txt").write_text(f"version : {name}\n")
    return root


def test_a_session_reads_the_newest_measures_kept_and_a_relaunch_its_own(
    catalog: Catalog, dataset: str, tmp_path: Path
) -> None:
    """Where the measures are kept one directory per version, a new session mounts the newest
    (by name; links, files, directories without a measures tree and names being copied in as
    ``.<name>`` do not count), a relaunch the version its past session read, and one no longer
    kept is refused in one sentence."""
    root = versions(tmp_path / "measures", "2026-10-01", "2026-11-01")
    (root / ".2026-12-01" / "geodetic").mkdir(parents=True)
    (root / "2026-12-04" / "ephemerides").mkdir(parents=True)
    (root / "2026-12-02").symlink_to(root / "2026-11-01")
    (root / "2026-12-03").write_text("not a tree\n")
    plan = run({"dataset": dataset}, catalog, Backend(catalog, measures_root=root))
    assert plan.measures_version == "2026-11-01"
    (mount,) = [m for m in plan.mounts if m.kind == "measures"]
    assert (mount.path, mount.sub_path, mount.read_only) == (
        "/opt/casa/measures",
        "2026-11-01",
        True,
    )

    past = replace(past_session(dataset), measures="2026-10-01")
    backend = Backend(catalog, past=[past], measures_root=root)
    plan = run({"relaunch": past.name}, catalog, backend)
    assert plan.measures_version == "2026-10-01" and "measures 2026-10-01" in backend.calls
    # Remembered again, the relaunch names the same version.
    again = PastSession.from_plan(plan, "again", datetime.now(timezone.utc), DIGEST)
    assert PastSession.from_state(again.as_state()) == again and again.measures == "2026-10-01"

    shutil.rmtree(root / "2026-10-01")
    with pytest.raises(InvalidInput) as refused:
        run({"relaunch": past.name}, catalog, Backend(catalog, past=[past], measures_root=root))
    assert str(refused.value) == (
        "The measures data that session read (2026-10-01) is no longer kept on this hub, so it "
        "cannot be relaunched exactly; start a new session instead."
    )
    # A session remembered before the measures were kept by version reads the newest.
    plan = run(
        {"relaunch": past.name},
        catalog,
        Backend(catalog, past=[past_session(dataset)], measures_root=root),
    )
    assert plan.measures_version == "2026-11-01"


def test_a_measures_volume_with_no_version_is_the_hubs_fault(
    catalog: Catalog, dataset: str, tmp_path: Path
) -> None:
    empty = tmp_path / "measures"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match="holds no measures version"):
        run({"dataset": dataset}, catalog, Backend(catalog, measures_root=empty))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        run({"dataset": dataset}, catalog, Backend(catalog, measures_root=tmp_path / "absent"))


def test_past_sessions_saved_before_measures_were_versioned_still_load(dataset: str) -> None:
    saved = past_session(dataset).as_state()
    del saved["measures"]
    assert PastSession.from_state(saved) == past_session(dataset)
    assert PastSession.from_state({**saved, "measures": "../elsewhere"}) is None
    assert PastSession.from_state({**saved, "sha256": "short"}) is None
