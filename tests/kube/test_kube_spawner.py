"""CASASpawner without a cluster: options, validation, identity, the form, state and trait translation."""

from __future__ import annotations

import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import dataset_in
from kube_support import FakeUser, auth_state
from pss import restricted_violations

from casaspawner.datasets.synth import write_dataset
from casaspawner.plan import Identity, StorageLayout
from casaspawner.session.options import options_from_form
from casaspawner.session.readers import StorageRoot, locate_in_storage
from casaspawner.spawners.errors import SpawnException


def sentence(exc: pytest.ExceptionInfo) -> str:
    """The one sentence a user sees (form error / progress page)."""
    message = exc.value.jupyterhub_message
    assert "\n" not in message and message.endswith((".", "?")) and len(message) < 400, message
    assert exc.value.status_code == 400
    return message


async def refused(spawner, options) -> str:
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options(options)
    return sentence(info)


# ------------------------------------------------------------------------------------------ validation
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
        ({"dataset": "data", "release": "casa-99"}, "'casa-99' is not a release in the catalog; choose one from the list."),
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
        "(300 characters)' cannot be opened (File name too long); give an ALMA dataset directory or an ALMA "
        "identifier."
    )
    assert str(storage) not in message


async def test_resolution_failure_is_one_sentence(make_spawner, storage):
    dataset = dataset_in(storage, "alice", "no-evidence")
    message = await refused(make_spawner(), {"dataset": dataset})
    assert message.startswith(f"Nothing in {dataset} tells which CASA version")
    assert str(storage) not in message  # the hub's own paths stay private


async def test_release_override_disallowed(make_spawner, storage, catalog):
    spawner = make_spawner(allow_release_override=False)
    release = catalog.available(("modular",))[0].id
    message = await refused(spawner, {"dataset": dataset_in(storage, "alice", "cycle10"), "release": release})
    assert message == "This hub does not allow choosing a CASA release other than the resolved one."


async def test_identity_rules(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    root = make_spawner(FakeUser(auth_state=auth_state(uid=0)))
    assert (await refused(root, dataset)) == "User alice would run as uid 0; sessions never run as root."
    no_uid = make_spawner(FakeUser(auth_state=auth_state(uid=None)))
    assert "carries no numeric user id" in await refused(no_uid, dataset)
    no_state = make_spawner(FakeUser(auth_state=None))
    assert "carries no numeric user id" in await refused(no_state, dataset)
    bad = make_spawner(FakeUser(auth_state=auth_state(uid="abc")))
    assert (await refused(bad, dataset)) == "The uid of alice in the login data is not a number."
    bad_gids = make_spawner(FakeUser(auth_state=auth_state(gids="100")))
    assert (await refused(bad_gids, dataset)) == "The group ids of alice in the login data are not a list."
    bad_groups = make_spawner(FakeUser(auth_state={"oauth_user": {"uid": 5, "groups": "proja"}}))
    assert (await refused(bad_groups, dataset)) == "The groups of alice in the login data are not a list."

    fallback = make_spawner(FakeUser(auth_state=None, groups=("proja",)), fallback_uid=4242)
    plan = await fallback.prepare_session(dataset)
    assert (plan.identity.uid, plan.identity.gid, plan.identity.groups) == (4242, 4242, ("proja",))
    assert fallback.access_token is None and fallback.token_secret_name is None

    zero_fallback = make_spawner(FakeUser(auth_state=None), fallback_uid=0)  # the operator's: the hub's fault
    with pytest.raises(SpawnException) as info:
        await zero_fallback._run_apply_user_options(dataset)
    assert info.value.status_code == 500 and info.value.jupyterhub_message == (
        "The hub's configuration is invalid: CASASpawner.fallback_uid is 0, not an id from 1 to 4294967294."
    )


async def test_identity_claims_and_hook(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    state = {"posix": {"uidNumber": "5001", "gidNumber": 6001}, "memberOf": ["/proja", "admins"], "tok": "T"}
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
    assert (plan.identity.uid, plan.identity.gid, plan.identity.supplemental_gids) == (7001, 7002, (7003,))


async def test_blocked_releases_list_and_async_callable(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    listed = make_spawner(blocked_releases=["pl-2023.1.0.124"])
    assert (await refused(listed, dataset)) == (
        "CASA 6.5.4-9 (pipeline 2023.1.0.124) cannot be started right now; try again later or choose another release."
    )

    calls = []

    async def drain(spawner):
        calls.append(spawner.user.name)
        return {"pl-2023.1.0.124": "CASA 6.5.4-9 is being updated until 14:00 UTC; please come back then."}

    drained = make_spawner(blocked_releases=drain)
    assert (
        await refused(drained, dataset)
    ) == "CASA 6.5.4-9 is being updated until 14:00 UTC; please come back then."
    assert calls == ["alice"]

    other = make_spawner(blocked_releases=["pl-2022.2.0.64"])
    plan = await other.prepare_session(dataset)
    assert plan.release.id == "pl-2023.1.0.124"


async def test_blocked_release_refused_before_any_object(cluster, make_spawner, storage):
    emulator, _server = cluster
    spawner = make_spawner(blocked_releases=["pl-2023.1.0.124"], start_timeout=10)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    with pytest.raises(SpawnException) as info:
        await spawner.start()  # an older hub: validation happens in load_user_options, inside start
    assert "cannot be started right now" in sentence(info)
    assert len(emulator) == 0  # not even a list or watch: nothing was asked of Kubernetes


# ------------------------------------------------------------------------------------------ storage paths
def test_locate_in_storage_is_pure_and_strict():
    layout = StorageLayout()
    alice = Identity("alice", 1001, 1001, groups=("proja",))
    home = StorageRoot("/arc/home/alice", "home/alice")
    project = StorageRoot("/arc/projects/proja", "projects/proja")
    assert locate_in_storage("data/x", alice, layout) == (
        home,
        locate_in_storage("~/data/x", alice, layout)[1],
    )
    assert locate_in_storage("/arc/home/alice/data/x", alice, layout)[0] == home
    assert str(locate_in_storage("/arc/projects/proja/shared", alice, layout)[1]) == "shared"
    assert locate_in_storage("/arc/projects/proja", alice, layout)[0] == project
    for bad in ("/arc/home/alice/../bob", "/arc/home/alicex/data", "/arc/projects/projb/x", "/", "a/../../b"):
        with pytest.raises(Exception, match=r"outside your storage|may not contain"):
            locate_in_storage(bad, alice, layout)


async def test_project_paths_and_absolute_home_paths(make_spawner, storage):
    spawner = make_spawner()
    member = dataset_in(storage, "alice", "cycle7")
    plan = await spawner.prepare_session({"dataset": f"/arc/home/alice/{member}"})
    assert plan.release.pipeline == "2020.1.0.40"
    project = next((storage / "projects" / "proja" / "shared").glob("*/science_goal.*/group.*/member.*"))
    relative = project.relative_to(storage / "projects" / "proja")
    plan = await make_spawner().prepare_session({"dataset": f"/arc/projects/proja/{relative}"})
    assert plan.release.casa.startswith("6.4.1")
    no_member = make_spawner(FakeUser(auth_state=auth_state(groups=())))
    assert "outside your storage" in await refused(no_member, {"dataset": f"/arc/projects/proja/{relative}"})


async def test_without_storage_paths_ask_for_an_identifier(make_spawner):
    spawner = make_spawner(storage_hub_path=None)
    message = await refused(spawner, {"dataset": "data/x"})
    assert message.endswith("give the dataset's ALMA identifier.")


async def test_identifier_resolved_through_archive_client(make_spawner, tmp_path):
    from casaspawner.datasets.synth import ERAS, manifest_xml

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
    # a directory named after its project code (as ALMA's downloads unpack) is read from storage, not looked up
    plan = await spawner.prepare_session({"dataset": "2023.1.00545.S"})
    assert (plan.release.pipeline, plan.resolution.evidence.kind, archive.asked) == (
        "2023.1.0.124",
        "manifest",
        [],
    )
    await spawner.prepare_session({"dataset": "2019.1.00994.S"})  # not in storage: the archive is asked
    assert archive.asked == ["2019.1.00994.S"]


# ------------------------------------------------------------------------------------------ the plan on the pod
async def test_user_options_summary_and_labels_merge(make_spawner, storage):
    z2jh = {"hub.jupyter.org/network-access-hub": "true", "casaspawner.io/interface": "set-by-operator"}
    spawner = make_spawner(extra_labels=dict(z2jh), extra_annotations={"team": "alma"})
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "desktop"}
    )
    assert spawner.user_options == {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "desktop"}
    pod, _ = await spawner.session_manifests()
    spawner.record_session(spawner.session_plan)
    assert spawner.user_options["profile"] == spawner.session_plan.summary
    assert spawner.user_options["profile"].startswith(
        "CASA 6.5.4-9 (pipeline 2023.1.0.124) · CASA desktop · "
    )
    output = spawner.user_options["casaspawner"]
    assert (output["casa_version"], output["interface"], output["release"]) == (
        "6.5.4-9",
        "desktop",
        "pl-2023.1.0.124",
    )
    labels = pod["metadata"]["labels"]
    assert labels["hub.jupyter.org/network-access-hub"] == "true"
    assert labels["casaspawner.io/interface"] == "set-by-operator"  # never replaced
    assert labels["casaspawner.io/release"] == "pl-2023.1.0.124"
    assert labels["component"] == "singleuser-server"
    assert pod["metadata"]["annotations"]["team"] == "alma"
    assert (
        pod["metadata"]["annotations"]["casaspawner.io/processed-with"]
        == "CASA 6.5.4-9, pipeline 2023.1.0.124"
    )


async def test_plan_wins_over_profile_overrides(make_spawner, storage):
    profile_list = [
        {
            "display_name": "Default",
            "slug": "default",
            "kubespawner_override": {
                "image": "quay.io/jupyter/minimal-notebook",
                "uid": 0,
                "node_selector": {"pool": "casa"},
                "extra_labels": {"profile": "default"},
            },
        }
    ]
    spawner = make_spawner(profile_list=profile_list, fs_gid=100)
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    await spawner._run_apply_user_options(spawner.user_options)
    pod, _ = await spawner.session_manifests()
    assert pod["spec"]["containers"][0]["image"] == spawner.session_plan.image
    assert (
        pod["spec"]["securityContext"]["runAsUser"] == 1001
        and "fsGroup" not in pod["spec"]["securityContext"]
    )
    assert pod["spec"]["nodeSelector"] == {"pool": "casa"}  # what the plan does not decide, the profile does
    assert pod["metadata"]["labels"]["profile"] == "default"


async def test_no_leftovers_between_sessions(make_spawner, storage):
    user = FakeUser(auth_state=auth_state(groups=("proja",)))
    spawner = make_spawner(user, environment={"OPERATOR": "1"})
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle10"), "interface": "desktop"}
    )
    first, _ = await spawner.session_manifests()
    assert "/arc/projects/proja" in {m["mountPath"] for m in first["spec"]["containers"][0]["volumeMounts"]}
    spawner.clear_state()
    user.auth_state = auth_state(groups=(), token=None)
    await spawner._run_apply_user_options(
        {"dataset": dataset_in(storage, "alice", "cycle7"), "interface": "lab"}
    )
    pod, secret = await spawner.session_manifests()
    paths = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert "/arc/projects/proja" not in paths
    assert "JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP" not in env and env["OPERATOR"] == "1"
    assert env["CASASPAWNER_PIPELINE"] == "2020.1.0.40" and "CASASPAWNER_TOKEN_FILE" not in env
    assert secret is None and "casa-token" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert spawner.default_url == "/lab"


async def test_groups_differing_only_in_case_are_both_mounted(make_spawner, storage):
    """'Proj' and 'proj' are two project directories: both reach the pod (and the plan names them apart)."""
    spawner = make_spawner(FakeUser(auth_state=auth_state(groups=("Proj", "proj"))))
    plan = await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    projects = [m for m in plan.mounts if m.group is not None]
    assert [(m.group, m.path) for m in projects] == [
        ("Proj", "/arc/projects/Proj"),
        ("proj", "/arc/projects/proj"),
    ]
    assert len({m.name for m in plan.mounts}) == len(plan.mounts)
    pod, _ = await spawner.session_manifests()
    mounts = {m["mountPath"]: m.get("subPath") for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/arc/projects/Proj"] == "projects/Proj" and mounts["/arc/projects/proj"] == "projects/proj"


async def test_session_environment(make_spawner, storage):
    """The reason reaches pods as it reaches local sessions; a profile's variables stay, the plan's win."""
    profile_list = [
        {"display_name": "Default", "slug": "default",
         "kubespawner_override": {"environment": {"SITE": "east", "CASASPAWNER_RELEASE": "from-profile"}}}
    ]  # fmt: skip
    spawner = make_spawner(profile_list=profile_list, environment={"OPERATOR": "1"})
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod, _ = await spawner.session_manifests()
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["CASASPAWNER_REASON"] == spawner.session_plan.reason and env["CASASPAWNER_REASON"].endswith(
        "."
    )
    assert (env["SITE"], env["OPERATOR"], env["CASASPAWNER_RELEASE"]) == ("east", "1", "pl-2023.1.0.124")


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
        assert path.startswith("/arc/home/alice/CASA-NOTICES") and "/" not in path[len("/arc/home/alice/") :]
        files[server] = path[len("/arc/home/alice/") :]
    assert len(set(files.values())) == len(files), files  # no two servers share a file
    assert (files[""], files["m87"], files["a-b"], files["a_b"], files["a.b"]) == (
        "CASA-NOTICES.md", "CASA-NOTICES-m87.md", "CASA-NOTICES-a-b.md", "CASA-NOTICES-a_b.md", "CASA-NOTICES-a.b.md"
    )  # fmt: skip
    for server in ("a b", "a/b", "a+b"):  # changed names say so with a hash of the real one
        assert re.fullmatch(r"CASA-NOTICES-a-b-[0-9a-f]{8}\.md", files[server]), files[server]


async def test_memory_as_kubespawner_takes_it(make_spawner, storage):
    sizes = {"s": {"mem_guarantee": 2 * 2**30, "mem_limit": 8 * 2**30, "description": "bytes"},
             "t": {"mem_limit": "1.5G"}, "u": {"mem_limit": 3 * 2**20 + 2**10}}  # fmt: skip
    spawner = make_spawner(session_sizes=sizes, default_size="s")
    assert {n: (r.mem_guarantee, r.mem_limit) for n, r in spawner.size_resources().items()} == {
        "s": ("2G", "8G"),
        "t": ("", "1.5G"),
        "u": ("", "3073K"),
    }
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod, _ = await spawner.session_manifests()
    resources = pod["spec"]["containers"][0]["resources"]
    assert (resources["limits"]["memory"], resources["requests"]["memory"]) == (8 * 2**30, 2 * 2**30)


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


async def test_token_never_in_pod_or_logs(make_spawner, storage, caplog):
    caplog.set_level(logging.DEBUG)
    spawner = make_spawner()
    spawner.log.setLevel(logging.DEBUG)
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod, secret = await spawner.session_manifests()
    assert spawner.access_token == "tok-SECRET-42"
    assert "tok-SECRET-42" not in json.dumps(pod) + json.dumps(secret) + json.dumps(spawner.get_state())
    assert "tok-SECRET-42" not in caplog.text
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "casa-token")
    assert mount == {"mountPath": "/var/run/secrets/casaspawner", "name": "casa-token", "readOnly": True}


# ------------------------------------------------------------------------------------------ the form + state
class _FormParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.fields, self.labels, self.ids, self.external = [], set(), set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("input", "select") and attrs.get("type") != "hidden":
            self.fields.append(attrs)
        if tag == "label" and "for" in attrs:
            self.labels.add(attrs["for"])
        for key in ("src", "href"):
            if attrs.get(key):
                self.external.append(attrs[key])


async def test_form_is_accessible_and_self_contained(make_spawner, storage, catalog):
    spawner = make_spawner()
    dataset = dataset_in(storage, "alice", "cycle10")
    await spawner._run_apply_user_options({"dataset": dataset, "interface": "desktop"})
    spawner.remember_dataset("<script>alert(1)</script>")
    html = await spawner.options_form(spawner)
    parser = _FormParser()
    parser.feed(html)
    assert not parser.external  # no external assets
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    names = {f.get("name") for f in parser.fields}
    assert names == {"dataset", "interface", "size", "release"}
    for field in parser.fields:  # every visible control has a label
        if field.get("type") != "radio":
            assert field["id"] in parser.labels
    assert "checked" in re.search(r'<input type="radio" name="interface" value="desktop"[^>]*>', html).group(
        0
    )
    assert f'value="{dataset}"' in html  # previous dataset prefilled and offered among the recent ones
    assert html.count('data-dataset="') == 2
    resolved = re.search(r'<option value="" selected>([^<]*)</option>', html).group(1)
    assert resolved.startswith("CASA 6.5.4-9 (pipeline 2023.1.0.124) — resolved for ")
    offered = re.findall(r'<option value="([^"]+)">', html)
    assert "pl-2023.1.0.124" not in offered and len(offered) >= len(catalog.available()) - 1 - len(
        spawner.size_resources()
    )
    assert 'id="casa-release-warning"' in html and "hidden" in html


def test_options_from_form():
    form = {
        "dataset": [" 2019.1.00001.S "],
        "interface": ["desktop"],
        "size": ["small"],
        "release": [""],
        "_xsrf": ["token"],
        "extra": ["x"],
    }
    assert options_from_form(form) == {
        "dataset": "2019.1.00001.S",
        "interface": "desktop",
        "size": "small",
        "extra": "x",
    }


async def test_recent_datasets_survive_restart_and_clear_state(make_spawner, storage):
    spawner = make_spawner(recent_datasets_limit=2)
    for era in ("cycle10", "cycle7", "cycle10", "cycle3-pipeline"):
        spawner.clear_state()
        await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", era)})
    expected = [dataset_in(storage, "alice", "cycle3-pipeline"), dataset_in(storage, "alice", "cycle10")]
    assert spawner.recent_datasets == expected
    state = spawner.get_state()
    assert state["casa_recent_datasets"] == expected and "pod_name" in state
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
    assert re.search(r'<option value="" selected>CASA 4\.5\.3 \(pipeline r36660\) — resolved for ', html)
    fresh.load_state({"casa_recent_datasets": "not a list"})
    assert fresh.recent_datasets == expected


async def test_entry_point_and_defaults(make_spawner):
    from importlib.metadata import entry_points

    from casaspawner.kube.spawner import CASASpawner

    names = {ep.name: ep for ep in entry_points(group="jupyterhub.spawners")}
    assert names["casa"].load() is CASASpawner
    spawner = make_spawner()
    assert spawner.cmd == ["jupyterhub-singleuser"]
    for name, trait in CASASpawner.class_traits(config=True).items():
        if trait.this_class.__module__.startswith("casaspawner"):
            assert trait.help and len(trait.help.split()) >= 5, name


async def test_operator_volumes_as_list_are_kept(make_spawner, storage):
    """z2jh may pass extraVolumes as a list; they stay, in order, next to the session's own volumes."""
    spawner = make_spawner(
        volumes=[{"name": "shared-config", "configMap": {"name": "site"}}],
        volume_mounts=[{"name": "shared-config", "mountPath": "/etc/site", "readOnly": True}],
    )
    await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    pod, _ = await spawner.session_manifests()
    assert pod["spec"]["volumes"][0] == {"name": "shared-config", "configMap": {"name": "site"}}
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert mounts[0]["mountPath"] == "/etc/site" and "/arc/home/alice" in {m["mountPath"] for m in mounts}


# ------------------------------------------------------------------------------------------ release override
async def test_release_override_starts_a_dataset_that_names_no_version(make_spawner, storage, catalog):
    """The resolver's advice ("choose a CASA release yourself") works, on the form and through REST."""
    dataset = dataset_in(storage, "alice", "no-evidence")
    chosen = catalog.get("pl-2020.1.0.40")
    for options in (
        options_from_form({"dataset": [dataset], "release": [chosen.id], "_xsrf": ["x"]}),  # the form
        {"dataset": dataset, "release": chosen.id},  # REST
    ):
        spawner = make_spawner()
        await spawner._run_apply_user_options(options)
        plan = spawner.session_plan
        assert (plan.release, plan.exact, plan.approximate) == (chosen, False, False)
        assert plan.reason.startswith(f"Nothing in {dataset} tells which CASA version processed it (")
        assert plan.reason.endswith(f"; you chose {chosen.label}.") and "yourself" not in plan.reason
        assert plan.environment["CASASPAWNER_EXACT"] == "false"
        assert plan.annotations["casaspawner.io/evidence"] == "none"
        assert plan.annotations["casaspawner.io/processed-with"] == "CASA unknown"
        assert plan.summary.endswith(" · not exact")
        messages = [event["message"] for event in spawner.plan_progress_events()]
        assert messages[0] == f"Dataset {dataset}: {chosen.label}, not the exact build."
        assert messages[2] == (
            f"Warning: you chose {chosen.label}; nothing in the dataset tells which CASA version processed it."
        )
        assert spawner.last_resolution is None  # nothing was resolved, so the form preselects nothing
        html = spawner.render_options_form()
        assert f'<option value="{chosen.id}" selected>' in html and "<details open>" in html


async def test_release_override_does_not_rescue_bad_paths_or_ids(make_spawner, storage, catalog, tmp_path):
    from casaspawner.errors import ResolutionError

    release = {"release": "pl-2020.1.0.40"}
    spawner = make_spawner()
    assert "choose a CASA release yourself" in await refused(
        spawner, {"dataset": dataset_in(storage, "alice", "no-evidence")}
    )
    for dataset, expected in (
        ("data/nothing-here", "There is no dataset directory"),
        ("data", "MOUS directories"),  # several datasets: still give one of them
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
    assert "has no data for project" in await refused(unknown, {"dataset": "2019.1.00001.S", **release})
    versionless = '<?xml version="1.0"?><piperesults name="x"><ouss><ous name="y"/></ouss></piperesults>'
    found = make_spawner(archive_client=Archive(versionless))
    plan = await found.prepare_session({"dataset": "2019.1.00001.S", **release})
    assert plan.release.id == "pl-2020.1.0.40" and not plan.exact


# ------------------------------------------------------------------------------------------ identity (more)
@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"gid": -1}, "The gid of alice in the login data is -1, which is not a valid id."),
        ({"uid": -5}, "The uid of alice in the login data is -5, which is not a valid id."),
        ({"uid": 1.9}, "The uid of alice in the login data is 1.9, not a whole number."),
        ({"uid": "1001.5"}, "The uid of alice in the login data is 1001.5, not a whole number."),
        ({"gid": 0}, "User alice would run with gid 0 (the root group), which this hub does not allow; ask "
                     "the hub's administrators."),
        ({"gids": [100, 0]}, "User alice would run with gid 0 (the root group), which this hub does not "
                             "allow; ask the hub's administrators."),
        ({"uid": True}, "The uid of alice in the login data is not a number."),
    ],
)  # fmt: skip
async def test_identity_sentences(make_spawner, storage, state, expected):
    spawner = make_spawner(FakeUser(auth_state=auth_state(**state)))
    assert await refused(spawner, {"dataset": dataset_in(storage, "alice", "cycle10")}) == expected


async def test_identity_whole_numbers_and_root_group_when_allowed(make_spawner, storage):
    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    plan = await make_spawner(FakeUser(auth_state=auth_state(uid=1001.0, gid="1002"))).prepare_session(
        dataset
    )
    assert (plan.identity.uid, plan.identity.gid) == (1001, 1002)
    allowed = make_spawner(FakeUser(auth_state=auth_state(gid=0, gids=[0])), allow_root_group=True)
    plan = await allowed.prepare_session(dataset)
    assert (plan.identity.gid, plan.identity.supplemental_gids) == (0, (0,))
    pod, _ = await allowed.session_manifests()
    assert pod["spec"]["securityContext"]["runAsGroup"] == 0 and restricted_violations(pod) == {}
    fallback = make_spawner(FakeUser(auth_state=None), fallback_uid=4000, fallback_gid=0)
    assert "gid 0 (the root group)" in await refused(fallback, dataset)


async def test_unusable_group_names_are_skipped_not_refused(make_spawner, storage, caplog):
    long_name = "g" * 70
    groups = ("proja", "/org/sub", "ivo://cadc.nrc.ca/gms?alma", long_name, "My Group", "/proja")
    spawner = make_spawner(FakeUser(auth_state=auth_state(groups=groups)))
    with caplog.at_level(logging.INFO):
        plan = await spawner.prepare_session({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert plan.identity.groups == ("proja",)
    assert "No project directories for 4 of alice's groups" in caplog.text and "'org/sub'" in caplog.text
    pod, _ = await spawner.session_manifests()
    paths = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "/arc/projects/proja" in paths and not any("org" in p or "gms" in p for p in paths)
    # a dataset in a project the user has no (usable) directory of is still a clear error
    assert await refused(make_spawner(FakeUser(auth_state=auth_state(groups=groups))), {
        "dataset": "/arc/projects/org/sub/data"
    }) == (
        "The dataset path '/arc/projects/org/sub/data' is outside your storage: 'org' is not one of your project "
        "directories (yours: proja)."
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ links in storage
@pytest.fixture
def linked_storage(tmp_path):
    """alice's home with links into her project (hub-absolute, relative, session-absolute) and out of it."""
    from casaspawner.datasets.synth import write_dataset

    root = tmp_path / "cavern"
    member = write_dataset(root / "projects" / "proja" / "shared", "cycle10")
    inside = member.relative_to(root / "projects" / "proja")
    write_dataset(root / "projects" / "projz" / "theirs", "cycle9")
    write_dataset(root / "home" / "bob" / "data", "cycle8")
    home = root / "home" / "alice"
    home.mkdir(parents=True)
    (home / "hub-link").symlink_to(root / "projects" / "proja" / "shared")
    (home / "relative-link").symlink_to(Path("..") / ".." / "projects" / "proja" / "shared")
    (home / "session-link").symlink_to("/arc/projects/proja/shared")  # made inside a session
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
    spawner = make_spawner(FakeUser(auth_state=auth_state(groups=("proja",))), storage_hub_path=str(root))
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
async def test_links_out_of_the_users_storage_are_refused(make_spawner, linked_storage, link, expected):
    root, _member = linked_storage
    spawner = make_spawner(FakeUser(auth_state=auth_state(groups=("proja",))), storage_hub_path=str(root))
    assert expected in await refused(spawner, {"dataset": link})
    # without the project, even the link into it leads out
    no_project = make_spawner(FakeUser(auth_state=auth_state(groups=())), storage_hub_path=str(root))
    assert "leads outside your storage" in await refused(no_project, {"dataset": "hub-link"})


# ------------------------------------------------------------------------------------------ operator errors
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"session_sizes": {"s": {"cpu_limit": "two"}}, "default_size": "s"},
         "CASASpawner.session_sizes['s']['cpu_limit'] is 'two', not a number of CPU cores (such as 0.5 or 4)."),
        ({"session_sizes": {"s": {"mem_limit": "lots"}}, "default_size": "s"},
         "CASASpawner.session_sizes['s']['mem_limit'] is 'lots', not an amount of memory (a number with K, M, G "
         "or T, such as '8G')."),
        ({"session_sizes": {"s": {"mem_limit": "8Gi"}}, "default_size": "s"},
         "CASASpawner.session_sizes['s']['mem_limit'] is '8Gi', the Kubernetes spelling; session memory is written "
         "as JupyterHub writes it, '8G' (its units are of 1024)."),
        ({"session_sizes": {"s": {"mem_limit": 10**9}}, "default_size": "s"},
         "CASASpawner.session_sizes['s']['mem_limit'] is 1000000000, not a positive number of bytes that is a "
         "multiple of 1024"),
        ({"image_template": "{registry}/{nope}"},
         "CASASpawner.image_template is '{registry}/{nope}', which uses {nope}; its fields are {registry}, {tag}, "
         "{casa}, {pipeline}, {id}."),
        ({"home_subpath_template": "home/{user}"},
         "CASASpawner.home_subpath_template is 'home/{user}', which uses {user}; its fields are {username}."),
        ({"home_mount_template": "/arc/home/{user}"},
         "CASASpawner.home_mount_template is '/arc/home/{user}', which uses {user}; its fields are {username}."),
        ({"project_mount_template": "/arc/projects/{group"},
         "CASASpawner.project_mount_template is '/arc/projects/{group', not a template (write {{ and }} for "
         "braces); its fields are {group}."),
        ({"project_subpath_template": "projects/{0}"},
         "CASASpawner.project_subpath_template is 'projects/{0}', which uses {0}; its fields are {group}."),
        ({"project_group_pattern": "proj-("},
         "CASASpawner.project_group_pattern is 'proj-(', not a regular expression (missing ), unterminated "
         "subpattern)."),
        ({"scratch_mount_path": "scratch"},
         "CASASpawner.scratch_mount_path is 'scratch'; a place in the session is an absolute path."),
        ({"fallback_gid": 2**32}, "CASASpawner.fallback_gid is 4294967296, not an id from 0 to 4294967294."),
        ({"session_sizes": {"s": {"cpu_guarantee": 4, "cpu_limit": 2}}, "default_size": "s"},
         "CASASpawner.session_sizes['s'] guarantees more CPU than its cpu_limit."),
        ({"session_sizes": {"s": {"cpus": 2}}, "default_size": "s"}, "CASASpawner.session_sizes['s'] must be a"),
        ({"session_sizes": {}}, "CASASpawner.session_sizes is empty"),
        ({"default_size": "nope"},
         "CASASpawner.default_size is 'nope', which is not one of CASASpawner.session_sizes (small, medium, large)."),
        ({"scratch_size_limit": "20 gigs"},
         "CASASpawner.scratch_size_limit is '20 gigs', not a Kubernetes quantity of bytes such as '20Gi'."),
        ({"tmp_size_limit": "0"}, "CASASpawner.tmp_size_limit is '0', not a Kubernetes quantity"),
        ({"storage_volume": {"persistentVolumeClaim": {}}},
         "the storage volume's persistentVolumeClaim settings need claimName."),
        ({"label_prefix": "Bad Prefix"}, "'Bad Prefix' is not a Kubernetes label prefix (a DNS subdomain)."),
        ({"catalog_path": "/nonexistent.yaml"}, "the catalog /nonexistent.yaml cannot be read"),
        ({"pod_security_level": "lax"}, "CASASpawner.pod_security_level is 'lax', not a Pod Security Standard "
                                        "level (restricted, baseline or privileged)."),
    ],
)  # fmt: skip
async def test_operator_config_errors_name_the_option(make_spawner, storage, config, expected):
    """One sentence naming the option, marked as the hub's fault (500), never "Invalid user options"."""
    spawner = make_spawner(**config)
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options(
            {"dataset": dataset_in(storage, "alice", "cycle10"), "size": "s"}
        )
    message = info.value.jupyterhub_message
    assert message.startswith("The hub's configuration is invalid: ") and expected in message, message
    assert info.value.status_code == 500 and "\n" not in message
    # the form still renders, saying the same
    assert expected.split(" (")[0].replace("'", "&#39;") in spawner.render_options_form()


async def test_operator_hooks_that_raise_are_one_sentence(make_spawner, storage):
    def broken(*args):
        return 1 / 0

    dataset = {"dataset": dataset_in(storage, "alice", "cycle10")}
    spawner = make_spawner(auth_state_hook=broken)
    with pytest.raises(SpawnException) as info:
        await spawner.run_auth_state_hook({})
    assert info.value.jupyterhub_message == (
        "The hub's configured auth_state_hook failed (ZeroDivisionError: division by zero)."
    )
    spawner = make_spawner(pre_spawn_hook=broken)
    with pytest.raises(SpawnException, match=r"configured pre_spawn_hook failed \(ZeroDivisionError"):
        await spawner.run_pre_spawn_hook()
    spawner = make_spawner(modify_pod_hook=broken)
    await spawner._run_apply_user_options(dict(dataset))
    with pytest.raises(SpawnException, match=r"configured modify_pod_hook failed \(ZeroDivisionError"):
        await spawner.session_manifests()
    spawner = make_spawner(modify_pod_hook=lambda spawner, pod: None)
    await spawner._run_apply_user_options(dict(dataset))
    with pytest.raises(SpawnException, match="modify_pod_hook returned nothing"):
        await spawner.session_manifests()

    def no_uid(spawner, auth_state):
        return {"gid": auth_state["oauth_user"]["uidNumber"]}

    spawner = make_spawner(identity_hook=no_uid)
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options(dict(dataset))
    assert info.value.status_code == 500
    assert (
        info.value.jupyterhub_message == "The hub's configured identity_hook failed (KeyError: 'uidNumber')."
    )
    spawner = make_spawner(group_overrides=broken)
    with pytest.raises(SpawnException) as info:
        await spawner.apply_group_overrides()  # as JupyterHub calls it before apply_user_options
    assert info.value.status_code == 500 and info.value.jupyterhub_message == (
        "The hub's configured group_overrides failed (ZeroDivisionError: division by zero)."
    )
    spawner = make_spawner(after_pod_created_hook=broken)
    pod = {"metadata": {"name": "jupyter-alice", "uid": "u-1"}}
    spawner._access_token = None  # no token Secret to create: the operator's hook runs at once
    with pytest.raises(SpawnException, match=r"configured after_pod_created_hook failed \(ZeroDivisionError"):
        await spawner.after_pod_created_hook(spawner, pod)


async def test_a_hub_fault_while_planning_is_one_sentence(make_spawner, storage, caplog):
    def broken_reader(spawner):
        raise RuntimeError("storage mount went away")

    spawner = make_spawner(dataset_reader=broken_reader)
    with pytest.raises(SpawnException) as info:
        await spawner._run_apply_user_options({"dataset": dataset_in(storage, "alice", "cycle10")})
    assert info.value.jupyterhub_message == (
        "The session could not be prepared because of a fault in the hub (RuntimeError: storage mount went away)."
    )
    assert info.value.status_code == 500 and "Traceback" in caplog.text  # the details are in the hub's log


# ------------------------------------------------------------------------------------------ the spawn's steps
async def test_dry_run_runs_the_hubs_steps_in_the_hubs_order(make_spawner, storage):
    calls = []

    async def auth_state_hook(spawner, auth_state):
        calls.append("auth_state_hook")
        spawner.extra_annotations = {**spawner.extra_annotations, "team": auth_state["oauth_user"]["team"]}

    def group_overrides(spawner):
        calls.append("group_overrides")
        return {
            "gpu": {
                "groups": ["proja"],
                "spawner_override": {"tolerations": [{"key": "gpu", "operator": "Exists"}]},
            }
        }

    def pre_spawn_hook(spawner):
        calls.append(
            "pre_spawn_hook" if spawner.session_plan is not None else "pre_spawn_hook before the plan"
        )
        spawner.node_selector = {"pool": "casa"}

    def modify_pod_hook(spawner, pod):
        calls.append("modify_pod_hook")
        return pod

    user = FakeUser(auth_state=auth_state(groups=("proja",), team="alma"), groups=("proja",))
    spawner = make_spawner(
        user,
        auth_state_hook=auth_state_hook,
        group_overrides=group_overrides,
        pre_spawn_hook=pre_spawn_hook,
        modify_pod_hook=modify_pod_hook,
    )
    spawner.user_options = {"dataset": dataset_in(storage, "alice", "cycle10")}
    pod, _ = await spawner.dry_run_manifests()
    assert calls == ["auth_state_hook", "group_overrides", "pre_spawn_hook", "modify_pod_hook"]
    assert pod["metadata"]["annotations"]["team"] == "alma"
    assert pod["metadata"]["annotations"]["casaspawner.io/dataset"] == spawner.user_options["dataset"]
    assert pod["spec"]["nodeSelector"] == {"pool": "casa"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]

    # the next session of the same spawner starts from the configuration again, plus its own hooks' values
    spawner.clear_state()
    user.auth_state = auth_state(groups=("proja",), team="vla")
    calls.clear()
    pod, _ = await spawner.dry_run_manifests()
    assert pod["metadata"]["annotations"]["team"] == "vla"


async def test_blocked_releases_are_not_offered(make_spawner, storage, catalog):
    spawner = make_spawner(blocked_releases=["pl-2022.2.0.64"])
    html = await spawner.options_form(spawner)
    assert 'value="pl-2022.2.0.64"' not in html and 'value="pl-2020.1.0.40"' in html

    async def drain(spawner):
        return {"pl-2020.1.0.40": "being replaced"}

    drained = make_spawner(blocked_releases=drain)
    html = await drained.options_form(drained)
    assert 'value="pl-2020.1.0.40"' not in html and 'value="pl-2022.2.0.64"' in html
