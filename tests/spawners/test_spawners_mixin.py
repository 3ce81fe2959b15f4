"""The spawners' shared hub side (``CASASessionMixin``) on JupyterHub's own ``Spawner``.

What both CASA spawners decide before a session starts: the options and the one sentence that
refuses them, identity from the login, the dataset in the user's storage, drained releases, a
chosen release, the form and the state the hub saves. tests/kube and tests/local check what each
backend adds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support.datasets import dataset_in
from support.spawners import refused
from support.users import FakeUser, auth_state
from support.vospace import vospace_service

from casaspawner.datasets.cache import RESOLUTIONS
from casaspawner.datasets.storage import STORAGE
from casaspawner.datasets.synth import ERAS, manifest_xml, write_dataset
from casaspawner.session.options import options_from_form
from casaspawner.session.readers import StorageMountReader
from casaspawner.spawners.errors import SpawnException


# ------------------------------------------------------------------------------------------
# validation
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"dataset": "2019.1.00001.S", "image": "evil"}, "'image' is not a session option"),
        ({}, "Give a dataset"),
        ({"dataset": "   "}, "Give a dataset"),
        ({"dataset": ["a", "b"]}, "must be text"),
        ({"dataset": "x\ny"}, "one line"),
        ({"dataset": "data", "interface": "vnc"}, "'vnc' is not an interface"),
        ({"dataset": "data", "size": "huge"}, "'huge' is not a session size"),
        (
            {"dataset": "data", "release": "casa-99"},
            "'casa-99' is not a release in the catalog; choose one from the list.",
        ),
        ({"dataset": "uid://A001/X1/Xzz"}, "not an ALMA dataset identifier"),
        ({"dataset": "2019.1.00001"}, "not an ALMA dataset identifier"),
        ({"dataset": "2019.1.00001.S"}, "No ALMA archive is configured"),
        ({"dataset": "../bob/data"}, "may not contain '..'"),
        ({"dataset": "/arc/home/bob/data"}, "is outside your storage"),
        ({"dataset": "/etc"}, "is outside your storage"),
        ({"dataset": "/arc/projects/projz/x"}, "is outside your storage"),
        ({"dataset": "escape"}, "leads outside your storage through a link"),
        ({"dataset": "data/nothing-here"}, "There is no dataset directory"),
    ],
)
async def test_bad_options_are_one_sentence(make_spawner, options, expected):
    spawner = make_spawner()
    message = await refused(spawner, options)
    assert expected in message
    assert spawner.session_plan is None


async def test_a_path_the_hub_cannot_open_is_the_users_one_sentence(make_spawner, storage):
    message = await refused(make_spawner(), {"dataset": "a" * 300})
    assert message.endswith(
        "(300 characters)' cannot be opened (File name too long); give an ALMA dataset directory "
        "or an ALMA identifier."
    )
    assert str(storage) not in message


async def test_resolution_failure_is_one_sentence(make_spawner, storage):
    dataset = dataset_in(storage, "alice", "no-evidence")
    message = await refused(make_spawner(), {"dataset": dataset})
    assert message.startswith(f"Nothing in {dataset} tells which CASA version")
    # The hub's own paths stay private.
    assert str(storage) not in message


async def test_release_override_disallowed(make_spawner, storage, catalog):
    spawner = make_spawner(allow_release_override=False)
    release = catalog.available(("modular",))[0].id
    message = await refused(
        spawner, {"dataset": dataset_in(storage, "alice", "cycle10"), "release": release}
    )
    assert (
        message == "This hub does not allow choosing a CASA release other than the resolved one."
    )


# ------------------------------------------------------------------------------------------
# identity
async def test_a_login_without_a_usable_identity_is_refused_or_falls_back(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    root = make_spawner(FakeUser(auth_state=auth_state(uid=0)))
    assert (
        await refused(root, dataset)
    ) == "User alice would run as uid 0; sessions never run as root."
    no_uid = make_spawner(FakeUser(auth_state=auth_state(uid=None)))
    assert "carries no numeric user id" in await refused(no_uid, dataset)
    no_state = make_spawner(FakeUser(auth_state=None))
    assert "carries no numeric user id" in await refused(no_state, dataset)
    bad = make_spawner(FakeUser(auth_state=auth_state(uid="abc")))
    assert (await refused(bad, dataset)) == "The uid of alice in the login data is not a number."
    bad_gids = make_spawner(FakeUser(auth_state=auth_state(gids="100")))
    assert (
        await refused(bad_gids, dataset)
    ) == "The group ids of alice in the login data are not a list."
    bad_groups = make_spawner(FakeUser(auth_state={"oauth_user": {"uid": 5, "groups": "proja"}}))
    assert (
        await refused(bad_groups, dataset)
    ) == "The groups of alice in the login data are not a list."

    fallback = make_spawner(FakeUser(auth_state=None, groups=("proja",)), fallback_uid=4242)
    plan = await fallback.prepare_session(dataset)
    assert (plan.identity.uid, plan.identity.gid, plan.identity.groups) == (4242, 4242, ("proja",))
    # tests/kube/test_kube_spawner.py: no token either, and a fallback uid of 0 refused.
    assert fallback.access_token is None


async def test_the_identity_comes_from_the_configured_claims_or_the_hook(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    state = {
        "posix": {"uidNumber": "5001", "gidNumber": 6001},
        "memberOf": ["/proja", "admins"],
        "tok": "T",
    }
    spawner = make_spawner(
        FakeUser(auth_state=state),
        uid_claim="posix.uidNumber",
        gid_claim="posix.gidNumber",
        groups_claim="memberOf",
        access_token_claim="tok",
        project_group_pattern="proj.*",
    )
    plan = await spawner.prepare_session(dataset)
    assert (plan.identity.uid, plan.identity.gid, plan.identity.groups) == (5001, 6001, ("proja",))
    assert spawner.access_token == "T"

    async def hook(spawner, auth_state):
        return {"uid": 7001, "gid": 7002, "groups": ["proja"], "supplemental_gids": [7003]}

    hooked = make_spawner(identity_hook=hook)
    plan = await hooked.prepare_session(dataset)
    assert (plan.identity.uid, plan.identity.gid, plan.identity.supplemental_gids) == (
        7001,
        7002,
        (7003,),
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"gid": -1}, "The gid of alice in the login data is -1, which is not a valid id."),
        ({"uid": -5}, "The uid of alice in the login data is -5, which is not a valid id."),
        ({"uid": 1.9}, "The uid of alice in the login data is 1.9, not a whole number."),
        ({"uid": "1001.5"}, "The uid of alice in the login data is 1001.5, not a whole number."),
        (
            {"gid": 0},
            "User alice would run with gid 0 (the root group), which this hub does not allow; ask "
            "the hub's administrators.",
        ),
        (
            {"gids": [100, 0]},
            "User alice would run with gid 0 (the root group), which this hub does not allow; "
            "ask the hub's administrators.",
        ),
        ({"uid": True}, "The uid of alice in the login data is not a number."),
    ],
)
async def test_ids_in_the_login_that_are_not_ids_are_one_sentence(
    make_spawner, storage, state, expected
):
    spawner = make_spawner(FakeUser(auth_state=auth_state(**state)))
    assert await refused(spawner, {"dataset": dataset_in(storage, "alice", "cycle10")}) == expected


async def test_identity_whole_numbers_and_root_group_when_allowed(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    plan = await make_spawner(
        FakeUser(auth_state=auth_state(uid=1001.0, gid="1002"))
    ).prepare_session(dataset)
    assert (plan.identity.uid, plan.identity.gid) == (1001, 1002)
    allowed = make_spawner(FakeUser(auth_state=auth_state(gid=0, gids=[0])), allow_root_group=True)
    plan = await allowed.prepare_session(dataset)
    assert (plan.identity.gid, plan.identity.supplemental_gids) == (0, (0,))
    fallback = make_spawner(FakeUser(auth_state=None), fallback_uid=4000, fallback_gid=0)
    assert "gid 0 (the root group)" in await refused(fallback, dataset)


# ------------------------------------------------------------------------------------------
# storage paths
async def test_project_paths_and_absolute_home_paths(make_spawner, storage):
    spawner = make_spawner()
    member = dataset_in(storage, "alice", "cycle7")
    plan = await spawner.prepare_session({"dataset": f"/arc/home/alice/{member}"})
    assert plan.release.pipeline == "2020.1.0.40"
    project = next(
        (storage / "projects" / "proja" / "shared").glob("*/science_goal.*/group.*/member.*")
    )
    relative = project.relative_to(storage / "projects" / "proja")
    plan = await make_spawner().prepare_session({"dataset": f"/arc/projects/proja/{relative}"})
    assert plan.release.casa.startswith("6.4.1")
    no_member = make_spawner(FakeUser(auth_state=auth_state(groups=())))
    assert "outside your storage" in await refused(
        no_member, {"dataset": f"/arc/projects/proja/{relative}"}
    )


async def test_a_dataset_read_before_costs_one_trip_to_a_storage_thread_and_no_worker(
    make_spawner, tmp_path, monkeypatch
):
    """The walk to a dataset resolved before and the cache's look below it share one trip to the
    hub's storage threads; a dataset changed since is read again."""
    monkeypatch.setattr(RESOLUTIONS, "settle", 0)
    storage = tmp_path / "cavern"
    member = write_dataset(storage / "home" / "alice" / "data", "cycle10")
    text = str(member.relative_to(storage / "home" / "alice"))
    first = await make_spawner(storage_hub_path=str(storage)).prepare_session({"dataset": text})
    trips: list[str] = []

    def counted(real: Any) -> Any:
        async def call(func: Any, *args: Any, **kwargs: Any) -> Any:
            trips.append(getattr(func, "__name__", type(func).__name__))
            return await real(func, *args, **kwargs)

        return call

    monkeypatch.setattr(STORAGE, "call", counted(STORAGE.call))
    monkeypatch.setattr(asyncio, "to_thread", counted(asyncio.to_thread))
    hits = RESOLUTIONS.hits
    again = await make_spawner(storage_hub_path=str(storage)).prepare_session({"dataset": text})
    assert again.resolution == first.resolution and RESOLUTIONS.hits == hits + 1
    assert trips == ["walk_and_inspect"]
    manifest = next(member.rglob("*pipeline_manifest.xml"))
    manifest.write_text(manifest_xml(ERAS["cycle9"]))
    changed = await make_spawner(storage_hub_path=str(storage)).prepare_session({"dataset": text})
    assert changed.release.pipeline == ERAS["cycle9"].pipeline != first.release.pipeline
    assert RESOLUTIONS.hits == hits + 1


async def test_the_event_loop_never_looks_at_the_storage(make_spawner, tmp_path, monkeypatch):
    """Neither reading a dataset (the walk, the resolution's link, the cache's key) nor finding it
    kept opens or stats anything in the storage from the hub's event loop."""
    monkeypatch.setattr(RESOLUTIONS, "settle", 0)
    storage = (tmp_path / "cavern").resolve()
    member = write_dataset(storage / "home" / "alice" / "data", "cycle10")
    text = str(member.relative_to(storage / "home" / "alice"))
    loop_thread = threading.current_thread()
    on_loop: list[str] = []

    def spied(real: Any) -> Any:
        def call(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
            if threading.current_thread() is loop_thread:
                where = Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / path if dir_fd else path
                if storage in Path(os.path.realpath(where)).parents:
                    on_loop.append(f"{real.__name__} {where}")
            return real(path, *args, dir_fd=dir_fd, **kwargs)

        return call

    monkeypatch.setattr(os, "open", spied(os.open))
    monkeypatch.setattr(os, "stat", spied(os.stat))
    hits = RESOLUTIONS.hits
    plans = [
        await make_spawner(storage_hub_path=str(storage)).prepare_session({"dataset": text})
        for _ in ("read", "kept")
    ]
    assert plans[0].resolution == plans[1].resolution and RESOLUTIONS.hits == hits + 1
    assert plans[0].resolution.evidence.kind == "manifest"
    assert on_loop == []


async def test_storage_that_does_not_answer_ends_the_spawn_with_one_sentence(
    make_spawner, tmp_path, monkeypatch
):
    """A look at the storage past ``resolve_timeout`` ends the wait with one sentence; one of the
    hub's storage threads, not one it shares, holds the look, and closes what it opened late."""
    storage = tmp_path / "cavern"
    member = write_dataset(storage / "home" / "alice" / "data", "cycle10")
    text = str(member.relative_to(storage / "home" / "alice"))
    released = threading.Event()
    walk = StorageMountReader._walk
    walked_in: list[str] = []

    def hung(self: StorageMountReader, *args: Any) -> Any:
        walked_in.append(threading.current_thread().name)
        released.wait(30)
        return walk(self, *args)

    monkeypatch.setattr(StorageMountReader, "_walk", hung)
    before = len(os.listdir("/proc/self/fd"))
    spawner = make_spawner(storage_hub_path=str(storage), resolve_timeout=0.2)
    message = await refused(spawner, {"dataset": text})
    assert message == (
        f"The storage did not answer within 0.2 seconds while the hub looked at {text!r}; "
        "try again in a few minutes."
    )
    assert walked_in[0].startswith("casaspawner-storage-")
    released.set()
    for _ in range(100):
        if len(os.listdir("/proc/self/fd")) == before:
            break
        await asyncio.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) == before


async def test_without_storage_paths_ask_for_an_identifier(make_spawner):
    spawner = make_spawner(storage_hub_path=None)
    message = await refused(spawner, {"dataset": "data/x"})
    assert message.endswith("give the dataset's ALMA identifier.")


async def test_identifier_resolved_through_archive_client(make_spawner, tmp_path):
    class Archive:
        name = "test-archive"

        def __init__(self):
            self.asked = []

        def fetch_manifest(self, identifier):
            self.asked.append(str(identifier))
            path = tmp_path / "member.pipeline_manifest.xml"
            path.write_text(manifest_xml(ERAS["cycle9"]))
            return path

    archive = Archive()
    storage = tmp_path / "cavern"
    write_dataset(storage / "home" / "alice" / "2023.1.00545.S", "cycle10")
    spawner = make_spawner(storage_hub_path=str(storage), archive_client=lambda spawner: archive)
    for spelling in ("uid://A001/X2d20/X3ee5", "uid___A001_X2d20_X3ee5"):
        plan = await spawner.prepare_session({"dataset": spelling})
        assert archive.asked.pop() == "uid://A001/X2d20/X3ee5"
        assert plan.release.pipeline == "2022.2.0.64"
        assert plan.resolution.evidence.kind == "archive-manifest"
    # a directory named after its project code (as ALMA's downloads unpack) is read from storage,
    # not looked up
    plan = await spawner.prepare_session({"dataset": "2023.1.00545.S"})
    assert (plan.release.pipeline, plan.resolution.evidence.kind, archive.asked) == (
        "2023.1.0.124",
        "manifest",
        [],
    )
    # Not in storage: the archive is asked.
    await spawner.prepare_session({"dataset": "2019.1.00994.S"})
    assert archive.asked == ["2019.1.00994.S"]


# ------------------------------------------------------------------------------------------ links
# in storage
@pytest.fixture
def linked_storage(tmp_path):
    """alice's home with links into her project (hub-absolute, relative, session-absolute) and out
    of it."""
    root = tmp_path / "cavern"
    member = write_dataset(root / "projects" / "proja" / "shared", "cycle10")
    inside = member.relative_to(root / "projects" / "proja")
    write_dataset(root / "projects" / "projz" / "theirs", "cycle9")
    write_dataset(root / "home" / "bob" / "data", "cycle8")
    home = root / "home" / "alice"
    home.mkdir(parents=True)
    (home / "hub-link").symlink_to(root / "projects" / "proja" / "shared")
    (home / "relative-link").symlink_to(Path("..") / ".." / "projects" / "proja" / "shared")
    # Made inside a session.
    (home / "session-link").symlink_to("/arc/projects/proja/shared")
    (home / "chain").symlink_to("session-link")
    (home / "to-projz").symlink_to("/arc/projects/projz/theirs")
    (home / "to-bob").symlink_to(Path("..") / "bob" / "data")
    (home / "through-bob").symlink_to("/arc/home/bob/../alice/hub-link")
    (home / "loop-a").symlink_to("loop-b")
    (home / "loop-b").symlink_to("loop-a")
    (home / "etc").symlink_to("/etc")
    return root, str(inside.relative_to("shared"))


@pytest.mark.parametrize("link", ["hub-link", "relative-link", "session-link", "chain"])
async def test_links_within_the_users_own_storage_are_followed(make_spawner, linked_storage, link):
    root, member = linked_storage
    spawner = make_spawner(
        FakeUser(auth_state=auth_state(groups=("proja",))), storage_hub_path=str(root)
    )
    plan = await spawner.prepare_session({"dataset": f"~/{link}/{member}"})
    assert plan.release.id == "pl-2023.1.0.124" and plan.exact
    assert plan.resolution.dataset == f"~/{link}/{member}"


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        ("to-projz", "leads outside your storage through a link"),
        ("to-bob", "leads outside your storage through a link"),
        ("through-bob", "leads outside your storage through a link"),
        ("etc", "leads outside your storage through a link"),
        ("loop-a", "goes through too many links"),
    ],
)
async def test_links_out_of_the_users_storage_are_refused(
    make_spawner, linked_storage, link, expected
):
    root, _member = linked_storage
    spawner = make_spawner(
        FakeUser(auth_state=auth_state(groups=("proja",))), storage_hub_path=str(root)
    )
    assert expected in await refused(spawner, {"dataset": link})
    # without the project, even the link into it leads out
    no_project = make_spawner(
        FakeUser(auth_state=auth_state(groups=())), storage_hub_path=str(root)
    )
    assert "leads outside your storage" in await refused(no_project, {"dataset": "hub-link"})


# ------------------------------------------------------------------------------------------
# VOSpace
@pytest_asyncio.fixture(loop_scope="function")
async def vospace(storage):
    """A VOSpace-like service over the storage tree that wants alice's token."""
    async with vospace_service(storage) as service:
        yield service


async def test_vospace_is_read_with_the_token_of_the_login(make_spawner, storage, vospace):
    """tests/session/test_session_vospace.py reads through VOSpace; here the token comes from
    the login data, as the spawners read it."""
    url, requests = vospace
    spawner = make_spawner(storage_hub_path=None, vospace_url=url)
    plan = await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert plan.release.id == "pl-2023.1.0.124" and plan.exact
    assert requests


async def test_vospace_needs_the_users_token(make_spawner, storage, vospace):
    url, _ = vospace
    spawner = make_spawner(
        FakeUser(auth_state=auth_state(token="wrong")), storage_hub_path=None, vospace_url=url
    )
    with pytest.raises(SpawnException) as info:
        await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert info.value.jupyterhub_message.endswith("(HTTP 401).")


# ------------------------------------------------------------------------------------------
# drained releases
async def test_blocked_releases_list_and_async_callable(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    listed = make_spawner(blocked_releases=["pl-2023.1.0.124"])
    assert (await refused(listed, dataset)) == (
        "CASA 6.5.4-9 (pipeline 2023.1.0.124) cannot be started right now; try again later or "
        "choose another release."
    )

    calls = []

    async def drain(spawner):
        calls.append(spawner.user.name)
        return {
            "pl-2023.1.0.124": "CASA 6.5.4-9 is being updated until 14:00 UTC; please come back "
            "then."
        }

    drained = make_spawner(blocked_releases=drain)
    assert (
        await refused(drained, dataset)
    ) == "CASA 6.5.4-9 is being updated until 14:00 UTC; please come back then."
    assert calls == ["alice"]

    other = make_spawner(blocked_releases=["pl-2022.2.0.64"])
    plan = await other.prepare_session(dataset)
    assert plan.release.id == "pl-2023.1.0.124"


async def test_blocked_releases_are_not_offered(make_spawner, storage, catalog):
    spawner = make_spawner(blocked_releases=["pl-2022.2.0.64"])
    html = await spawner.options_form(spawner)
    assert 'value="pl-2022.2.0.64"' not in html and 'value="pl-2020.1.0.40"' in html

    async def drain(spawner):
        return {"pl-2020.1.0.40": "being replaced"}

    drained = make_spawner(blocked_releases=drain)
    html = await drained.options_form(drained)
    assert 'value="pl-2020.1.0.40"' not in html and 'value="pl-2022.2.0.64"' in html


# ------------------------------------------------------------------------------------------
# release override
async def test_release_override_is_marked(make_spawner, storage, catalog):
    chosen = catalog.available(("modular",))[-1]
    spawner = make_spawner()
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle10"), "release": chosen.id}
    )
    plan = spawner.session_plan
    assert plan.release.id == chosen.id and not plan.exact
    messages = [event["message"] for event in spawner.plan_progress_events()]
    assert any(m.startswith(f"Warning: you chose {chosen.label}") for m in messages)
    assert plan.summary.endswith("not exact")


async def test_release_override_starts_a_dataset_that_names_no_version(
    make_spawner, storage, catalog
):
    """The resolver's advice ("choose a CASA release yourself") works, on the form and through
    REST."""
    dataset = dataset_in(storage, "alice", "no-evidence")
    chosen = catalog.get("pl-2020.1.0.40")
    for options in (
        # The form.
        options_from_form({"dataset": [dataset], "release": [chosen.id], "_xsrf": ["x"]}),
        # REST.
        {"dataset": dataset, "release": chosen.id},
    ):
        spawner = make_spawner()
        await spawner._run_apply_user_options(options)
        plan = spawner.session_plan
        assert (plan.release, plan.exact, plan.approximate) == (chosen, False, False)
        assert plan.reason.startswith(
            f"Nothing in {dataset} tells which CASA version processed it ("
        )
        assert (
            plan.reason.endswith(f"; you chose {chosen.label}.") and "yourself" not in plan.reason
        )
        assert plan.environment["CASASPAWNER_EXACT"] == "false"
        assert plan.annotations["casaspawner.io/evidence"] == "none"
        assert plan.annotations["casaspawner.io/processed-with"] == "CASA unknown"
        assert plan.summary.endswith(" · not exact")
        messages = [event["message"] for event in spawner.plan_progress_events()]
        assert messages[0] == f"Dataset {dataset}: {chosen.label}, not the exact build."
        assert messages[2] == (
            f"Warning: you chose {chosen.label}; nothing in the dataset tells which CASA version "
            "processed it."
        )
        # Nothing was resolved, so the form preselects nothing.
        assert spawner.last_resolution is None
        html = spawner.render_options_form()
        assert f'<option value="{chosen.id}" selected>' in html and "<details open>" in html


async def test_release_override_does_not_rescue_bad_paths_or_ids(
    make_spawner, storage, catalog, tmp_path
):
    from casaspawner.errors import ResolutionError

    release = {"release": "pl-2020.1.0.40"}
    spawner = make_spawner()
    assert "choose a CASA release yourself" in await refused(
        spawner, {"dataset": dataset_in(storage, "alice", "no-evidence")}
    )
    for dataset, expected in (
        ("data/nothing-here", "There is no dataset directory"),
        # Several datasets: still give one of them.
        ("data", "MOUS directories"),
        ("escape", "leads outside your storage through a link"),
        ("uid://A001/X1/Xzz", "not an ALMA dataset identifier"),
    ):
        assert expected in await refused(make_spawner(), {"dataset": dataset, **release}), dataset
    no_override = make_spawner(allow_release_override=False)
    assert "does not allow choosing" in await refused(
        no_override, {"dataset": dataset_in(storage, "alice", "no-evidence"), **release}
    )

    class Archive:
        name = "test-archive"

        def __init__(self, manifest: str | None):
            self.manifest = manifest

        def fetch_manifest(self, identifier):
            if self.manifest is None:
                raise ResolutionError(f"The ALMA archive has no data for project {identifier}.")
            path = tmp_path / "member.uid___A001_X1_X1.pipeline_manifest.xml"
            path.write_text(self.manifest)
            return path

    unknown = make_spawner(archive_client=Archive(None))
    assert "has no data for project" in await refused(
        unknown, {"dataset": "2019.1.00001.S", **release}
    )
    versionless = (
        '<?xml version="1.0"?><piperesults name="x"><ouss><ous name="y"/></ouss></piperesults>'
    )
    found = make_spawner(archive_client=Archive(versionless))
    plan = await found.prepare_session({"dataset": "2019.1.00001.S", **release})
    assert plan.release.id == "pl-2020.1.0.40" and not plan.exact


# ------------------------------------------------------------------------------------------ the
# form + state
async def test_the_form_shows_the_last_options_the_recent_datasets_and_the_resolution(
    make_spawner, storage
):
    """What the spawner puts into the form (tests/session/test_session_form.py checks the form)."""
    spawner = make_spawner()
    dataset = dataset_in(storage, "alice", "cycle10")
    await spawner._run_apply_user_options({"dataset": dataset, "interface": "desktop"})
    spawner.remember_dataset("<script>alert(1)</script>")
    html = await spawner.options_form(spawner)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    desktop = r'<input type="radio" name="interface" value="desktop"[^>]*>'
    assert "checked" in re.search(desktop, html).group(0)
    # The previous dataset is prefilled, and offered among the recent ones.
    assert f'value="{dataset}"' in html
    assert html.count('data-dataset="') == 2
    resolved = re.search(r'<option value="" selected>([^<]*)</option>', html).group(1)
    assert resolved.startswith("CASA 6.5.4-9 (pipeline 2023.1.0.124) — resolved for ")


async def test_recent_datasets_survive_restart_and_clear_state(make_spawner, storage):
    spawner = make_spawner(recent_datasets_limit=2)
    for era in ("cycle10", "cycle7", "cycle10", "cycle3-pipeline"):
        spawner.clear_state()
        await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", era)})
    expected = [
        dataset_in(storage, "alice", "cycle3-pipeline"),
        dataset_in(storage, "alice", "cycle10"),
    ]
    assert spawner.recent_datasets == expected
    state = spawner.get_state()
    assert state["casa_recent_datasets"] == expected
    spawner.clear_state()
    assert spawner.recent_datasets == expected and spawner.session_plan is None
    fresh = make_spawner()
    fresh.load_state(json.loads(json.dumps(state)))
    assert fresh.recent_datasets == expected
    assert fresh.last_resolution == state["casa_last_resolution"]
    assert fresh.last_resolution == {
        "dataset": expected[0],
        "release": "pl-r36660",
        "exact": True,
        "reason": spawner.last_resolution["reason"],
    }
    assert "r36660" in fresh.last_resolution["reason"]
    # after a hub restart the form still preselects what the last dataset resolved to
    html = fresh.render_options_form()
    assert re.search(
        r'<option value="" selected>CASA 4\.5\.3 \(pipeline r36660\) — resolved for ', html
    )
    fresh.load_state({"casa_recent_datasets": "not a list"})
    assert fresh.recent_datasets == expected


async def test_every_server_has_its_own_notice_file(make_spawner, storage):
    from jupyterhub import orm

    files = {}
    for server in ("", "m87", "a-b", "a b", "a_b", "a/b", "a.b", "a+b"):
        spawner = make_spawner(
            notices_url="http://127.0.0.1:10101/services/casa-sessions/api/notices",
            orm_spawner=orm.Spawner(name=server),
        )
        await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
        path = spawner.notices_environment(spawner.session_plan)["CASASPAWNER_NOTICES_FILE"]
        assert (
            path.startswith("/arc/home/alice/CASA-NOTICES")
            and "/" not in path[len("/arc/home/alice/") :]
        )
        files[server] = path[len("/arc/home/alice/") :]
    # No two servers share a file.
    assert len(set(files.values())) == len(files), files
    assert (files[""], files["m87"], files["a-b"], files["a_b"], files["a.b"]) == (
        "CASA-NOTICES.md",
        "CASA-NOTICES-m87.md",
        "CASA-NOTICES-a-b.md",
        "CASA-NOTICES-a_b.md",
        "CASA-NOTICES-a.b.md",
    )
    for server in ("a b", "a/b", "a+b"):
        # Changed names say so with a hash of the real one.
        assert re.fullmatch(r"CASA-NOTICES-a-b-[0-9a-f]{8}\.md", files[server]), files[server]


# ------------------------------------------------------------------------------------------ hub
# faults
async def test_a_hub_fault_while_planning_is_one_sentence(make_spawner, storage, caplog):
    def broken_reader(spawner):
        raise RuntimeError("storage mount went away")

    spawner = make_spawner(dataset_reader=broken_reader)
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert info.value.jupyterhub_message == (
        "The session could not be prepared because of a fault in the hub (RuntimeError: storage "
        "mount went away)."
    )
    # The details are in the hub's log.
    assert info.value.status_code == 500 and "Traceback" in caplog.text
